"""Operators the TorchScript ONNX exporter lacks, written out for the export; the rest refused in one line.

A model that runs in PyTorch must not fail the export with a traceback: `aten::rms_norm` (torch's nn.RMSNorm,
timm's RmsNorm under fast norm, e.g. `vit_base_patch16_xp_224`) has no ONNX symbolic at any opset this project
exports, so during the export each such module is swapped for the same maths in plain ops (mean of squares,
rsqrt, scale: ReduceMean/Sqrt/Div/Mul, all in onnxruntime 1.16.3), sharing its weight, so names and values stay.
Each swap is checked on a random input first; one that differs stays as it was. An operator still missing then
is named in one `InputError` (exit 2).
"""
from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from ..adapters.base import set_module
from ..core.errors import InputError

TOL = 1e-5


class WrittenRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dims (`channels`: over dim 1 of NCHW), in plain ops."""

    def __init__(self, src: nn.Module, channels: bool):
        super().__init__()
        self.dims = (1,) if channels else tuple(range(-len(src.normalized_shape), 0))
        self.channels, self.eps = channels, src.eps
        self.weight = src.weight  # the same Parameter (or None): the exported initializer keeps its name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps  # torch's default for eps=None
        y = x * torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + eps)
        if self.weight is not None:
            y = y * (self.weight.reshape(1, -1, 1, 1) if self.channels else self.weight)
        return y


def _kinds() -> dict[type, bool]:
    """RMSNorm classes -> normalises over channels (NCHW) rather than the last dims."""
    kinds = {nn.RMSNorm: False} if hasattr(nn, "RMSNorm") else {}
    try:
        from timm.layers import norm as tn
    except ImportError:
        return kinds
    for name, channels in (("RmsNorm", False), ("RmsNormFp32", False), ("RmsNorm2d", True), ("RmsNorm2dFp32", True)):
        if hasattr(tn, name):
            kinds[getattr(tn, name)] = channels
    return kinds


def _same(old: nn.Module, new: WrittenRMSNorm) -> bool:
    c = old.weight.shape[0] if old.weight is not None else 8
    shape = (2, c, 3, 3) if new.channels else (2, 3, *old.normalized_shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(old.weight.dtype if old.weight is not None
                                                                         else torch.float32)
    with torch.no_grad():
        ref, got = old(x), new(x)
    return bool((ref - got).abs().max() <= TOL * ref.abs().max().clamp_min(1e-12))


@contextlib.contextmanager
def written_out(model: nn.Module):
    """Within the block, the model's RMSNorm modules are plain-op equivalents (put back afterwards)."""
    kinds = _kinds()
    swapped = []
    for name, m in list(model.named_modules()):
        if name and type(m) in kinds:
            new = WrittenRMSNorm(m, kinds[type(m)])
            if _same(m, new):
                set_module(model, name, new)
                swapped.append((name, m))
    try:
        yield [n for n, _ in swapped]
    finally:
        for name, m in swapped:
            set_module(model, name, m)


def refusal(e: Exception, opset: int) -> InputError | None:
    """One line for an operator the exporter has no ONNX form of, or None for another failure."""
    if not isinstance(e, torch.onnx.errors.UnsupportedOperatorError):
        return None
    op = re.search(r"operator '([^']+)'", str(e))
    what = op.group(1) if op else str(e).splitlines()[0][:80]
    return InputError(f"export: the ONNX exporter has no form of the operator {what} at opset {opset}, and this "
                      "project does not write it out; replace that operation in the model by plain tensor ops, or "
                      "export safetensors only (export.formats: [safetensors])")
