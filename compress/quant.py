"""Static int8 with accuracy control (export.int8_max_kl): calibration method and float layers chosen by the KL of
the int8 file to the fp32 file on held-out images, as NNCF / Neural Compressor / Optimum do it.

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
from pathlib import Path

import torch

from .metrics import fidelity, ort_run, ort_session
from .onnx_lean import light

METHODS = ("minmax", "entropy", "percentile")
RANKED_OPS = ("Conv", "MatMul", "Gemm")  # the layers ranked and kept float; other ops follow their inputs
BATCH = 8  # calibration images per batch fed to the calibrator


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
                     calibrate_method=how, nodes_to_quantize=only, nodes_to_exclude=list(exclude))


def ranked_nodes(base: Path) -> list[tuple[str, str]]:
    """(name, op) of the layers the accuracy control ranks, in graph order."""
    return [(n.name, n.op_type) for n in light(base).graph.node if n.op_type in RANKED_OPS and n.name]


class Scorer:
    """KL of an int8 file to the fp32 file (`base`) on held-out images, with the fp32 logits computed once."""

    def __init__(self, base: Path, held: torch.Tensor, threads: int):
        self.held, self.threads = held, threads
        self.ref = torch.from_numpy(ort_run(ort_session(base, threads), held.numpy()))

    def __call__(self, path: Path) -> float:
        return fidelity(self.ref, torch.from_numpy(ort_run(ort_session(path, self.threads), self.held.numpy())))["kl"]


def controlled_static(base: Path, out: Path, x: torch.Tensor, held: torch.Tensor, max_kl: float, *,
                      threads: int = 2, big: bool = False, methods=METHODS) -> dict:
    """Write `out`: static int8 whose KL to `base` on `held` is at most max_kl where any mix of float layers allows.
    Returns the record: the KL of each calibration method, the one chosen, each layer kept float with its
    sensitivity, the file's KL and whether it meets the bound."""
    score = Scorer(base, held, threads)
    work = Path(tempfile.mkdtemp(prefix="compress-int8-", dir=out.parent))
    try:
        def kl_of(name: str, **kw) -> float:
            p = work / f"{name}.onnx"
            quantize_static(base, p, x, method, big=big, **kw)
            return score(p)

        by_method = {}
        for method in methods:
            by_method[method] = kl_of(method)
        method = min(by_method, key=lambda m: (by_method[m], methods.index(m)))
        rec = {"bound": max_kl, "methods_kl": by_method, "method": method, "plain_kl": by_method[method],
               "kept_float": []}
        kl = by_method[method]
        if kl > max_kl:
            nodes = ranked_nodes(base)
            alone = {name: kl_of(f"alone{i}", only=[name]) for i, (name, _) in enumerate(nodes)}
            ops = dict(nodes)
            for name in sorted(alone, key=lambda n: -alone[n]):
                if kl <= max_kl:
                    break
                rec["kept_float"].append({"node": name, "op": ops[name], "kl_alone": alone[name]})
                kl = kl_of(f"mixed{len(rec['kept_float'])}", exclude=[k["node"] for k in rec["kept_float"]])
                rec["kept_float"][-1]["kl_after"] = kl
            rec["layers_ranked"] = len(nodes)
        quantize_static(base, out, x, method, exclude=[k["node"] for k in rec["kept_float"]], big=big)
        rec.update(kl=kl, meets=kl <= max_kl, held_out_images=len(held))
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)

