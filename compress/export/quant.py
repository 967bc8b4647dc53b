"""Static int8 with accuracy control: calibration method and float layers chosen by how far the int8 file is from the
fp32 file on held-out images (its KL, or the share of changed predictions), as NNCF / Neural Compressor / Optimum do it.
The bound is export.int8_max_kl, export.int8_max_disagreement, or derived from the accuracy target (`bound_for`).

One layer with an outlier channel puts all of its neighbours' activations in one or two of the 256 int8 steps: the
whole file then drifts, however well the rest quantizes. So: quantize with each calibration method and keep the
lowest KL; when that is above the bound, rank the layers by the KL of a file in which only that layer is quantized
(its sensitivity), and keep the most sensitive in float, one at a time, until the file's KL is below the bound.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..measure.metrics import fidelity, ort_run, ort_session
from .onnx_lean import light

METHODS = ("minmax", "entropy", "percentile")
RANKED_OPS = ("Conv", "MatMul", "Gemm")  # the layers ranked and kept float; other ops follow their inputs
BATCH = 8  # calibration images per batch fed to the calibrator
# Of a max_top1_drop budget, the share the int8 file may spend (as disagreement with the fp32 file). A changed
# prediction moves top-1 by at most one image, so disagreement bounds quantization's part of the drop from above (a
# conservative bound: most changed predictions were wrong before or after). The other half is left to the structural
# change and distillation, which are measured against the teacher by the gate itself; the shared ResNet's int8_static
# file changed 0.1 pt of top-1 (issue 32), so half of a 1-point budget is rarely what binds.
QUANT_SHARE = 0.5


@dataclass(frozen=True)
class Bound:
    """What the int8 file's distance to the fp32 file may be: metric "kl" or "disagreement" (1 - top-1 agreement),
    its value, and where it came from (the recipe key, or the derivation)."""

    metric: str
    value: float
    source: str


def bound_for(export, gates, target=None) -> Bound | None:
    """The int8_static bound of a recipe's sections: an explicit export.int8_max_kl wins, then
    export.int8_max_disagreement, then QUANT_SHARE of target/gates.max_top1_drop (points) as disagreement."""
    if export.int8_max_kl is not None:
        return Bound("kl", export.int8_max_kl, "export.int8_max_kl")
    if export.int8_max_disagreement is not None:
        return Bound("disagreement", export.int8_max_disagreement, "export.int8_max_disagreement")
    for where, drop in (("target", getattr(target, "max_top1_drop", None)), ("gates", gates.max_top1_drop)):
        if drop is not None:
            return Bound("disagreement", QUANT_SHARE * drop / 100,
                         f"{QUANT_SHARE:g} x {where}.max_top1_drop {drop:g} pt (a changed prediction moves top-1 by at "
                         "most one image)")
    return None


def distance(f: dict, metric: str) -> float:
    """A fidelity() record's value for the bound's metric."""
    return f["kl"] if metric == "kl" else 1.0 - f["agreement"]


def float_nodes(base: Path) -> list[str]:
    """Nodes that stay float in every int8 file: token merging's matching (`/match/`, core/merging.py), whose
    similarities pick indices; quantized, they would pick other tokens than the float file does."""
    return [n.name for n in light(base).graph.node if "/match/" in n.name]


def quantize_static(base: Path, out: Path, x: torch.Tensor, method: str = "minmax", *, only: list[str] | None = None,
                    exclude: list[str] = (), big: bool = False) -> None:
    """onnxruntime's QDQ static quantization (per-channel int8 weights, uint8 activations) calibrated on x.
    only: quantize these nodes alone; exclude: keep these nodes float."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i:i + BATCH].numpy()} for i in range(0, len(x), BATCH)])

        def get_next(self):
            return next(self.batches, None)

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice at WARNING on the root logger
    how = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}[method]
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
        ort_quantize(str(base), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                     activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, use_external_data_format=big,
                     calibrate_method=how, nodes_to_quantize=only, nodes_to_exclude=[*exclude, *float_nodes(base)])


def ranked_nodes(base: Path) -> list[tuple[str, str]]:
    """(name, op) of the layers the accuracy control ranks, in graph order."""
    return [(n.name, n.op_type) for n in light(base).graph.node if n.op_type in RANKED_OPS and n.name
            and "/match/" not in n.name]


class Scorer:
    """KL of an int8 file to the fp32 file (`base`) on held-out images, with the fp32 logits computed once;
    `fidelity(path)`: KL, agreement and the rest."""

    def __init__(self, base: Path, held: torch.Tensor, threads: int):
        self.held, self.threads = held, threads
        self.ref = torch.from_numpy(ort_run(ort_session(base, threads), held.numpy()))

    def fidelity(self, path: Path) -> dict:
        return fidelity(self.ref, torch.from_numpy(ort_run(ort_session(path, self.threads), self.held.numpy())))

    def __call__(self, path: Path) -> float:
        return self.fidelity(path)["kl"]


def controlled_static(base: Path, out: Path, x: torch.Tensor, held: torch.Tensor, bound: float | Bound, *,
                      threads: int = 2, big: bool = False, methods=METHODS, reference: Path | None = None) -> dict:
    """Write `out`: static int8 whose distance to `base` on `held` is within `bound` (a float: a KL bound) where any
    mix of float layers allows. The calibration method is the one closest to `base` (ties: lowest KL); layers are
    ranked by KL, continuous where disagreement on a few images is not. Returns the record: each method's KL, the one
    chosen, each layer kept float with its sensitivity, the file's KL and disagreement, and whether it meets.
    reference: the fp32 file scored against when it is not `base` (a QAT file is measured against model.onnx)."""
    if not isinstance(bound, Bound):
        bound = Bound("kl", float(bound), "export.int8_max_kl")
    score = Scorer(reference or base, held, threads)
    work = Path(tempfile.mkdtemp(prefix="compress-int8-", dir=out.parent))
    try:
        def fid(name: str, **kw) -> dict:
            p = work / f"{name}.onnx"
            quantize_static(base, p, x, method, big=big, **kw)
            return score.fidelity(p)

        def far(f: dict) -> float:
            return distance(f, bound.metric)

        by_method = {}
        for method in methods:
            by_method[method] = fid(method)
        method = min(by_method, key=lambda m: (far(by_method[m]), by_method[m]["kl"], methods.index(m)))
        f = by_method[method]
        rec = {"bound": bound.value, "metric": bound.metric, "source": bound.source,
               "methods_kl": {m: v["kl"] for m, v in by_method.items()}, "method": method, "plain_kl": f["kl"],
               "plain_disagreement": 1.0 - f["agreement"], "kept_float": []}
        if far(f) > bound.value:
            nodes = ranked_nodes(base)
            alone = {name: fid(f"alone{i}", only=[name])["kl"] for i, (name, _) in enumerate(nodes)}
            ops = dict(nodes)
            for name in sorted(alone, key=lambda n: -alone[n]):
                if far(f) <= bound.value:
                    break
                rec["kept_float"].append({"node": name, "op": ops[name], "kl_alone": alone[name]})
                f = fid(f"mixed{len(rec['kept_float'])}", exclude=[k["node"] for k in rec["kept_float"]])
                rec["kept_float"][-1].update(kl_after=f["kl"], disagreement_after=1.0 - f["agreement"])
            rec["layers_ranked"] = len(nodes)
        quantize_static(base, out, x, method, exclude=[k["node"] for k in rec["kept_float"]], big=big)
        rec.update(kl=f["kl"], disagreement=1.0 - f["agreement"], meets=far(f) <= bound.value,
                   held_out_images=len(held))
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
