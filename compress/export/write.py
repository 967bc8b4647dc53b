"""Writers: safetensors (with metadata) and ONNX, each verified before it gets its final name."""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from ..core.errors import VerificationError
from ..core.limits import release
from ..core.rsslog import mark
from ..load.frozen import one_input
from ..measure.metrics import fidelity, ort_run, ort_session
from . import runtimes
from .decompose import refusal, written_out
from .fuse import fused_qkv
from .onnx_lean import NotLean, export_lean, light
from .quant import Bound


def _publish(tmp: Path, final: Path) -> int:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 files; give every artifact the usual mode
    os.replace(tmp, final)
    return final.stat().st_size


def write_safetensors(model: nn.Module, path: Path, metadata: dict[str, str]) -> dict:
    """Save (shared tensors stored once), read back, compare every tensor, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata=metadata)
    back = load_file(str(tmp))
    own = model.state_dict()
    bad = [k for k, v in back.items() if k not in own or not torch.equal(v, own[k].detach().contiguous())]
    if bad:
        tmp.unlink()
        raise VerificationError(f"{path.name}: {len(bad)} tensors read back differently (e.g. {bad[0]}); not written")
    return {"path": path.name, "bytes": _publish(tmp, path), "tensors": len(back)}


def to_onnx(model: nn.Module, path: Path, input_size, *, opset: int, dynamic_batch: bool,
            fold_batchnorm: bool = True, lean: bool | None = None) -> None:
    """torch.onnx.export (TorchScript exporter: fast and mature for these graphs) + onnx.checker.

    fold_batchnorm=False keeps BatchNormalization nodes: folding gives each conv of a shared
    (tied) weight its own rescaled copy; onnxruntime still fuses them in memory at load.
    lean: the weights streamed in after the export (onnx_lean.py: a file to measure, not to ship), in one file
    (False) or in NAME.data (True); None: a plain export.
    """
    try:
        with written_out(model):  # operators the exporter lacks, in plain ops (decompose.py)
            _to_onnx(model, path, input_size, opset=opset, dynamic_batch=dynamic_batch, fold_batchnorm=fold_batchnorm,
                     lean=lean)
    except torch.onnx.errors.OnnxExporterError as e:
        raise (refusal(e, opset) or e) from None
    onnx.checker.check_model(str(path))


def _to_onnx(model, path: Path, input_size, *, opset, dynamic_batch, fold_batchnorm, lean) -> None:
    sample = torch.zeros((1, *input_size))
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    mode = torch.onnx.TrainingMode.EVAL if fold_batchnorm else torch.onnx.TrainingMode.PRESERVE  # model is in eval
    if lean is not None:
        try:
            with one_input(model):
                return export_lean(model, path, sample, opset=opset, axes=axes, mode=mode, external=lean)
        except NotLean:  # a plain export below
            for f in path.parent.iterdir():
                f.unlink()
    with warnings.catch_warnings(), torch.no_grad(), fused_qkv(model), one_input(model):  # one qkv MatMul per block (fuse.py)
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=False, opset_version=opset, training=mode,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)


def _weights(path: Path) -> int:
    """Number of stored initializer elements (weights as the file holds them)."""
    import numpy as np

    return sum(int(np.prod(i.dims)) for i in light(path).graph.initializer)


TRAINING_ONLY = {"Dropout", "Gradient", "SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"}


def _graph(path: Path) -> tuple[list[str], int]:
    """Operator set and node count; a graph with training-only nodes is refused."""
    g = light(path).graph
    ops = sorted({n.op_type for n in g.node})
    training = [n.name or n.op_type for n in g.node if n.op_type in TRAINING_ONLY
                or any(a.name == "training_mode" and a.i == 1 for a in n.attribute)]
    if training:
        path.unlink()
        raise VerificationError(f"{path.name}: training-only nodes left in the graph ({', '.join(training[:3])}); "
                                "export the model in eval mode")
    return ops, len(g.node)


def _parity(path: Path, ref: torch.Tensor, x: torch.Tensor, threads: int) -> dict:
    got = torch.from_numpy(ort_run(ort_session(path, threads), x.numpy()))
    return {**fidelity(ref, got), "images": len(x)}


def _verify(tmp: Path, name: str, parity: dict, *, tol: float | None = None, min_agreement: float | None = None) -> dict:
    """Delete `tmp` and fail unless it meets its precision's bar against the PyTorch student."""
    if tol is not None and not parity["rel_diff"] <= tol:
        tmp.unlink()
        raise VerificationError(f"{name}: onnxruntime differs from PyTorch by {parity['rel_diff']:.2e} of the logit "
                                f"scale (tolerance {tol:.0e}); not written. Try another export.opset or precision")
    if min_agreement is not None and not parity["agreement"] >= min_agreement:
        tmp.unlink()
        raise VerificationError(f"{name}: top-1 agreement with PyTorch is {100 * parity['agreement']:.1f}% on the "
                                f"calibration batch (needs {100 * min_agreement:.0f}%); not written. Drop this variant "
                                "or give calibration.data real images")
    return {**parity, "tolerance": tol, "min_agreement": min_agreement}


def _dynamo_onnx(model: nn.Module, path: Path, sample: torch.Tensor, *, opset: int) -> None:
    """torch.export with a symbolic batch dimension: `len(x)` stays symbolic where a trace bakes it in."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # strict (TorchDynamo): non-strict export runs the Python forward, where len(x) turns the batch into an
        # int and specialises it, exactly as the trace did
        program = torch.export.export(model.eval(), (sample,), dynamic_shapes=({0: batch},), strict=True)
        torch.onnx.export(program, (sample,), str(path), dynamo=True, opset_version=opset, verbose=False,
                          input_names=["input"], output_names=["logits"], external_data=False)
    # the dynamo exporter stamps the newest IR version (10), which older runtimes refuse; the graph uses
    # nothing newer than the torchscript exporter's IR 8
    m = onnx.load(str(path))
    if m.ir_version > 8:
        m.ir_version = 8
        onnx.save(m, str(path))
    onnx.checker.check_model(str(path))


def _batch_check(tmp: Path, ref: torch.Tensor, x: torch.Tensor, tol: float, threads: int) -> dict | str:
    """The parity record when onnxruntime matches PyTorch's `ref` at this batch; else what went wrong, in a few words."""
    ort.set_default_logger_severity(4)  # a failure is reported below, once, not also as an onnxruntime log line
    try:
        got = _parity(tmp, ref, x, threads)
    except Exception as e:  # noqa: BLE001 - onnxruntime's shape errors have no common public type
        return f"onnxruntime fails at batch {len(x)} ({str(e).strip().splitlines()[0][:120]})"
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warnings)
    return got if got["rel_diff"] <= tol else f"outputs at batch {len(x)} differ by {got['rel_diff']:.1e}"


def _export_batch(model: nn.Module, tmp: Path, calib: torch.Tensor, *, opset: int, tol: float, fold: bool,
                  threads: int, ref: torch.Tensor | None = None, lean: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, dict, dict | None]:
    """A dynamic-batch export that really works at another batch size, else a fixed batch-1 one.

    The trace runs at batch 1; a forward that reads the batch size as a Python int (`len(x)`,
    `int(x.shape[0])`) bakes 1 into the graph. Checked at batch >= 2; retried with the dynamo exporter;
    a fixed-batch file is the last resort, and the returned record says why. Returns the images checked on,
    PyTorch's logits for them (`ref`, the logits on calib, when the caller has them), how it was exported, the parity.
    """
    x = calib if len(calib) >= 2 else torch.cat([calib, calib])
    size = tuple(calib.shape[1:])
    if ref is None or len(x) != len(calib):
        with torch.no_grad():
            ref = model(x)
    to_onnx(model, tmp, size, opset=opset, dynamic_batch=True, fold_batchnorm=fold, lean=lean)
    baked = _batch_check(tmp, ref, x, tol, threads)
    if isinstance(baked, dict):
        return x, ref, {"dynamic_batch": True, "exporter": "torchscript"}, baked
    try:
        _dynamo_onnx(model, tmp, x[:2], opset=opset)
        again = _batch_check(tmp, ref, x, tol, threads)
    except Exception as e:  # noqa: BLE001 - torch.export refuses data-dependent code in many ways; all mean "cannot"
        again = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120] if str(e).strip() else ''}"
    if isinstance(again, dict):
        return x, ref, {"dynamic_batch": True, "exporter": "dynamo", "traced_batch_baked": baked}, again
    to_onnx(model, tmp, size, opset=opset, dynamic_batch=False, fold_batchnorm=fold, lean=lean)
    why = (f"the traced graph works at batch 1 only ({baked}; a forward that reads the batch size as a number, "
           f"e.g. len(x)); the dynamo exporter could not make it symbolic either ({again}); model.onnx takes batches of 1 only")
    return x[:1], None, {"dynamic_batch": False, "exporter": "torchscript", "fixed_batch": why}, None


def _on_runtimes(tmp: Path, name: str, parity: dict, ref: torch.Tensor, x: torch.Tensor, threads: int, old,
                 *, tol: float | None = None, min_agreement: float | None = None) -> dict:
    """The runtimes the file was run on: the installed one (`parity`) and, when given, the older
    export.min_runtime in its isolated venv, held to the same bar (`old` a dict: skipped, and why)."""
    runs = [{"onnxruntime": runtimes.installed(), "rel_diff": parity["rel_diff"], "agreement": parity["agreement"]}]
    if isinstance(old, runtimes.OldRuntime):
        got = torch.from_numpy(runtimes.run(old, tmp, name, x.numpy(), threads))
        p = _verify(tmp, f"{name} on onnxruntime {old.version}", {**fidelity(ref, got), "images": len(x)},
                    tol=tol, min_agreement=min_agreement)
        runs.append({"onnxruntime": old.version, "isolated": True, "rel_diff": p["rel_diff"], "agreement": p["agreement"]})
    elif old is not None:
        runs.append(old)
    ran = [r["onnxruntime"] for r in runs if "skipped" not in r]
    return {"runtimes": runs, "oldest_runtime": min(ran, key=runtimes.version_tuple)}


EXTERNAL_ABOVE = 1800 * 2**20  # weights above this go to NAME.data beside NAME (protobuf refuses files over 2 GiB)
# a file the installed runtime matched on the whole batch is held to the same tolerance on the older one on this many
# images: the check is that it loads and computes the same there (ViT-L: 16 images cost 6 s); int8 agreement uses all
OLD_IMAGES = 4
SLIM_AUTO_MAX = 512 * 2**20  # export.slim auto: larger files are not slimmed (onnxslim holds ~6x the file)


def _folder_bytes(folder: Path) -> int:
    """Size of an export in `folder`: the graph file and any external tensor files the exporter wrote beside it."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _save_proto(proto, path: Path, external: bool) -> None:
    """One file, or the graph plus all its weights in one NAME.data file (location relative, so the pair moves)."""
    for f in path.parent.iterdir():  # the exporter may have written one file per tensor: replaced below
        f.unlink()
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


@contextlib.contextmanager
def no_fastpath():
    """torch's nn.TransformerEncoder / nn.MultiheadAttention run a fused native op in eval (`_transformer_encoder_layer_fwd`,
    `_native_multi_head_attention`) that no ONNX exporter knows; their plain path is the same maths, so export that."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def write_onnx(model: nn.Module, path: Path, calib: torch.Tensor, *, opset: int, dynamic_batch: bool,
               tol: float, slim: bool | str = False, threads: int = 2, external_above: int = EXTERNAL_ABOVE,
               check: bool = True, old=None, ref: torch.Tensor | None = None, lean: bool = False) -> dict:
    """Export (+ onnxslim when it keeps the outputs), run in onnxruntime against PyTorch, rename if they agree.
    `ref`: the model's eval-mode logits on calib when the caller has them (each ViT-L forward costs seconds).
    lean: weights streamed in after a weightless export (onnx_lean.py; for a file measured, not shipped).

    Above `external_above` bytes the weights go to `NAME.data` beside `NAME` (ONNX external data); both
    files are verified together in a private folder, then moved into place (data first).
    check=False (only for a file that is measured for its size, never run or shipped) skips parity and slimming.
    """
    work = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        with no_fastpath():
            return _write_onnx(model, path, work / path.name, calib, opset=opset, dynamic_batch=dynamic_batch, tol=tol,
                               slim=slim if check else False, threads=threads, external_above=external_above, check=check,
                               old=old, ref=ref, lean=lean)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        release()


def _write_onnx(model, path: Path, tmp: Path, calib, *, opset, dynamic_batch, tol, slim, threads, external_above,
                check, old, ref, lean) -> dict:
    tied = any(getattr(m, "ties_weights", False) for m in model.modules())  # one weight used in two places
    # a lean export writes the final layout at once: NAME.data when the weights alone pass the threshold
    lean = (sum(t.numel() * t.element_size() for t in model.state_dict().values()) > external_above) if lean else None
    if dynamic_batch and check:
        x, ref, how, checked = _export_batch(model, tmp, calib, opset=opset, tol=tol, fold=not tied, threads=threads, ref=ref,
                                             lean=lean)
    else:  # a size-only file is not run, so its batch is not checked either
        to_onnx(model, tmp, tuple(calib.shape[1:]), opset=opset, dynamic_batch=dynamic_batch, fold_batchnorm=not tied,
                lean=lean)
        x, how, checked = (calib if dynamic_batch else calib[:1]), {"dynamic_batch": dynamic_batch, "exporter": "torchscript"}, None
    release()  # the exporter's graph and the parity session
    mark(f"{path.name}: torch.onnx.export + batch check")
    external = _folder_bytes(tmp.parent) > external_above
    if _one_or_two_files(tmp, external):
        checked = None  # the file run below is the one rewritten
    parity = slimmed = None
    if slim == "auto":  # onnxslim holds about 6x the file in memory: large models are shipped as exported
        size = _folder_bytes(tmp.parent)
        slim = size <= SLIM_AUTO_MAX
        if not slim:
            slimmed = {"applied": False, "why": f"{size / 2**20:.0f} MB is above export.slim auto's "
                                                f"{SLIM_AUTO_MAX / 2**20:.0f} MB (onnxslim needs ~6x the file in memory)"}
    if check:
        if ref is None or len(ref) != len(x):  # the fixed-batch file is checked on one image
            with torch.no_grad():
                ref = model(x)
        parity = _verify(tmp, path.name, checked or _parity(tmp, ref, x, threads), tol=tol)
        mark(f"{path.name}: parity")
    if slim:
        import onnxslim

        nodes = _graph(tmp)[1]
        cand_dir = tmp.parent / "slim"
        cand_dir.mkdir()
        cand = cand_dir / tmp.name
        proto = onnxslim.slim(onnx.load(str(tmp)))
        if external:
            onnx.save_model(proto, str(cand), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(proto, str(cand))
        del proto
        release()  # the loaded and the slimmed graph: up to twice the weights
        p2 = _parity(cand, ref, x, threads)
        # a model that shares a weight must keep storing it once (Conv+BN fusion gives each use its own copy);
        # elsewhere small constant rewrites by onnxslim are not duplication
        grew = tied and _weights(cand) > _weights(tmp)
        if p2["rel_diff"] <= tol and not grew:
            for f in cand_dir.iterdir():
                os.replace(f, tmp.parent / f.name)
            parity, slimmed = {**parity, **p2}, {"nodes_before": nodes, "applied": True}
        else:  # keep the plain export: slimming is an optimisation, never a reason to change outputs or size
            why = "it would store shared weights twice" if grew else f"changed outputs by {p2['rel_diff']:.1e}"
            slimmed = {"nodes_before": nodes, "applied": False, "why": why}
        shutil.rmtree(cand_dir)
        mark(f"{path.name}: slim")
    ran = _on_runtimes(tmp, path.name, parity, ref[:OLD_IMAGES], x[:OLD_IMAGES], threads, old, tol=tol) if check else {}
    mark(f"{path.name}: min_runtime check")
    ops, nodes = _graph(tmp)
    return {"path": path.name, **_publish_onnx(tmp, path), "precision": "fp32", "opset": opset, **how,
            "parity": parity, "operators": ops, "nodes": nodes, "slim": slimmed, **ran}


def _one_or_two_files(tmp: Path, external: bool) -> bool:
    """Make the export in tmp's private folder one file, or the graph plus one NAME.data (`external`);
    True when it had to be rewritten (the exporter or quantizer wrote another layout)."""
    files = sorted(f.name for f in tmp.parent.iterdir())
    if files == ([tmp.name, tmp.name + ".data"] if external else [tmp.name]):
        return False
    _save_proto(onnx.load(str(tmp)), tmp, external)
    release()
    return True


def _publish_onnx(tmp: Path, path: Path) -> dict:
    """Move an ONNX file (and its NAME.data) into place, the weights first: the graph appears only once what
    it points to is there. Bytes count both files: what a deployment ships."""
    data, external = tmp.with_name(tmp.name + ".data"), None
    if data.exists():
        external = {"path": data.name, "bytes": _publish(data, path.with_name(data.name))}
    else:
        path.with_name(data.name).unlink(missing_ok=True)  # a stale data file from an earlier, larger export
    size = _publish(tmp, path) + (external["bytes"] if external else 0)
    return {"files": [path.name, *([data.name] if external else [])], "external_data": external, "bytes": size}


def _private(path: Path) -> Path:
    """A private folder beside `path` in which a variant (graph, maybe NAME.data) is written and checked."""
    work = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work / path.name


# No fp16 CPU kernel in older onnxruntime (1.16): it falls back to the ops' function bodies, written
# for opset 17 (ReduceMean/ReduceMax with an axes attribute), and refuses an opset-18 graph. In float32
# they load everywhere, and normalisation and softmax are where fp16 loses the most precision anyway.
FP16_KEEP_FLOAT = ["LayerNormalization", "Softmax"]


def write_fp16(base: Path, path: Path, ref: torch.Tensor, x: torch.Tensor, *, tol: float, threads: int = 2,
               old=None, external_above: int = EXTERNAL_ABOVE) -> dict:
    """fp16 weights and activations inside, fp32 input and output (so callers feed the same tensors).
    Weights above `external_above` bytes go to NAME.data, as for model.onnx."""
    from onnxconverter_common import float16

    tmp = _private(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = onnx.load(str(base))
            match = [n.name for n in proto.graph.node if "/match/" in n.name]  # token merging's similarity: float
            proto = float16.convert_float_to_float16(proto, keep_io_types=True, node_block_list=match,
                                                     op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP16_KEEP_FLOAT)
        _save_proto(proto, tmp, sum(t.ByteSize() for t in proto.graph.initializer) > external_above)
        del proto
        release()
        parity = _verify(tmp, path.name, _parity(tmp, ref, x, threads), tol=tol)
        ran = _on_runtimes(tmp, path.name, parity, ref[:OLD_IMAGES], x[:OLD_IMAGES], threads, old, tol=tol)
        ops, nodes = _graph(tmp)
        return {"path": path.name, **_publish_onnx(tmp, path), "precision": "fp16", "parity": parity,
                "operators": ops, "nodes": nodes, "kept_float32": FP16_KEEP_FLOAT, **ran}
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
        release()


def write_int8(base: Path, path: Path, mode: str, ref: torch.Tensor, x: torch.Tensor, *, min_agreement: float,
               threads: int = 2, convs: bool = False, old=None, external_above: int = EXTERNAL_ABOVE,
               max_kl: float | None = None, held: torch.Tensor | None = None, bound=None,
               reference: Path | None = None) -> dict:
    """onnxruntime quantization: dynamic (weights int8, activations at run time) or static (QDQ, calibrated on x).
    Static with a bound (quant.Bound; max_kl: a KL bound): calibration method and float layers chosen by the
    distance to `reference` (default `base`: the fp32 file it is quantized from) on `held` (quant.py).

    Dynamic quantizes MatMul only unless `convs`: ConvInteger with int8 weights is missing from older
    runtimes and was 3.6-6x slower than the float conv on the ResNets measured (BENCHMARKS.md).
    Gemm (the classifier head) has no dynamic int8 form in onnxruntime's quantizer and stays float.
    Weights above `external_above` bytes go to NAME.data, as for model.onnx.
    """
    tmp = _private(path)
    try:
        return _write_int8(base, path, tmp, mode, ref, x, min_agreement=min_agreement, threads=threads, convs=convs,
                           old=old, external_above=external_above, held=held, reference=reference,
                           bound=bound if bound is not None or max_kl is None else Bound("kl", max_kl, "export.int8_max_kl"))
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
        release()


def _write_int8(base: Path, path: Path, tmp: Path, mode: str, ref, x, *, min_agreement, threads, convs, old,
                external_above, held, bound, reference) -> dict:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .quant import controlled_static, float_nodes, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs advice at WARNING on the root logger
    big = base.with_name(base.name + ".data").exists()  # a proto over 2 GiB cannot even be written in one file
    extra = {}
    if mode == "int8_dynamic":
        # one weight scale per output channel: a width-refit ViT student's MatMul weights range over channels so
        # unevenly that one scale per tensor left it agreeing with its fp32 file on 44% of 128 held-out images
        # (per channel: 100%, at the same latency, and it runs on onnxruntime 1.16.3)
        quantize_dynamic(str(base), str(tmp), weight_type=QuantType.QInt8, use_external_data_format=big,
                         op_types_to_quantize=["MatMul", "Conv"] if convs else ["MatMul"], per_channel=True,
                         nodes_to_exclude=float_nodes(base))
    elif bound is not None:
        extra["accuracy_control"] = rec = controlled_static(base, tmp, x, held if held is not None else x, bound,
                                                            threads=threads, big=big, reference=reference)
        if not rec["meets"]:
            extra["note"] = (f"{bound.metric} {rec[bound.metric]:.3g} to {(reference or base).name} is above the bound {bound.value:.3g} "
                             f"({bound.source}) even with every convolution and matrix product in float")
    else:
        quantize_static(base, tmp, x, big=big)
    _one_or_two_files(tmp, _folder_bytes(tmp.parent) > external_above)
    parity = _verify(tmp, path.name, _parity(tmp, ref, x, threads), min_agreement=min_agreement)
    ran = _on_runtimes(tmp, path.name, parity, ref, x, threads, old, min_agreement=min_agreement)
    ops, nodes = _graph(tmp)
    if mode == "int8_dynamic":
        import numpy as np

        inits = light(tmp).graph.initializer
        count = [(int(np.prod(i.dims)), i.data_type == onnx.TensorProto.INT8) for i in inits]
        extra["int8_weight_share"] = share = sum(n for n, q in count if q) / max(1, sum(n for n, _ in count))
        if share < 0.5:  # e.g. a ResNet: convolutions (left float) and one small MatMul/Gemm head
            extra["note"] = (f"only {100 * share:.1f}% of the weights are int8 (convolutions stay float unless "
                             "export.int8_dynamic_convs: true): this file computes mostly in float32 like model.onnx")
    return {"path": path.name, **_publish_onnx(tmp, path), "precision": mode, "parity": parity,
            "operators": ops, "nodes": nodes, **extra, **ran}
