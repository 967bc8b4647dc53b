"""Writers: safetensors (with metadata) and ONNX, each verified before it gets its final name."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import torch
from safetensors.torch import load_file, save_model
from torch import nn

from .errors import VerificationError
from .metrics import fidelity, ort_run, ort_session


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


def to_onnx(model: nn.Module, path: Path, input_size, *, opset: int, dynamic_batch: bool) -> None:
    """torch.onnx.export (TorchScript exporter: fast and mature for these graphs) + onnx.checker."""
    sample = torch.zeros((1, *input_size))
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (sample,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    onnx.checker.check_model(str(path))


def write_onnx(model: nn.Module, path: Path, calib: torch.Tensor, *, opset: int, dynamic_batch: bool,
               tol: float, threads: int = 2) -> dict:
    """Export, run in onnxruntime against PyTorch on the calibration batch, rename only if they agree."""
    tmp = path.with_name(path.name + ".tmp")
    to_onnx(model, tmp, tuple(calib.shape[1:]), opset=opset, dynamic_batch=dynamic_batch)
    x = calib if dynamic_batch else calib[:1]
    with torch.no_grad():
        ref = model(x)
    got = torch.from_numpy(ort_run(ort_session(tmp, threads), x.numpy()))
    parity = fidelity(ref, got)
    if not parity["rel_diff"] <= tol:
        tmp.unlink()
        raise VerificationError(f"{path.name}: onnxruntime differs from PyTorch by {parity['rel_diff']:.2e} of the logit "
                                f"scale (tolerance {tol:.0e}); not written. Try another export.opset")
    ops = sorted({n.op_type for n in onnx.load(str(tmp), load_external_data=False).graph.node})
    return {"path": path.name, "bytes": _publish(tmp, path), "opset": opset, "dynamic_batch": dynamic_batch,
            "parity": {**parity, "images": len(x), "tolerance": tol}, "operators": ops}
