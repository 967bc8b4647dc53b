"""Make a loaded model exportable for inference as it is: exactly, before anything else sees it.

- Weight-standardised convs (timm StdConv2d / ScaledStdConv2d, the hybrid ViTs' ResNet stems and resnetv2)
  standardise their weight with a training-mode batch_norm on every call; exported, that is a
  BatchNormalization node in training mode. Their weight does not depend on the input, so it is computed
  once and the layer becomes a plain Conv2d (or timm's Conv2dSame where it pads at run time).
- A forward with optional arguments beyond the image (timm Eva's `attn_mask`, `is_causal`): the TorchScript
  exporter passes their defaults as traced tensors; `one_input` hides them while exporting.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..adapters.base import set_module


class _Calls(TorchFunctionMode):
    """Records the conv weights a module computes and whether it normalised or padded on the way."""

    def __init__(self):
        super().__init__()
        self.weights, self.normalised, self.padded = [], False, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.conv2d, torch.conv2d):
            self.weights.append(args[1] if len(args) > 1 else kwargs["weight"])
        elif func in (F.batch_norm, torch.batch_norm, F.layer_norm, F.group_norm):
            self.normalised = True
        elif func in (F.pad,):
            self.padded = True
        return func(*args, **kwargs)


@torch.no_grad()
def _plain(conv: nn.Conv2d) -> nn.Conv2d | None:
    """The plain conv a Conv2d subclass computes, when it normalises its own weight (else None: left as it is)."""
    kh, kw = conv.kernel_size
    x = torch.zeros(1, conv.in_channels, kh * conv.dilation[0] + conv.stride[0], kw * conv.dilation[1] + conv.stride[1],
                    dtype=conv.weight.dtype, device=conv.weight.device)
    calls = _Calls()
    try:
        with calls:
            conv(x)
    except Exception:  # noqa: BLE001 - a conv that needs more than an image: leave it
        return None
    if not calls.normalised or len(calls.weights) != 1 or calls.weights[0].shape != conv.weight.shape:
        return None
    args = (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
    kw = {"dilation": conv.dilation, "groups": conv.groups, "bias": conv.bias is not None}
    if calls.padded:  # timm's run-time 'same' padding, kept as it was
        from timm.layers import Conv2dSame

        new = Conv2dSame(*args, padding=0, **kw)
    else:
        new = nn.Conv2d(*args, padding=conv.padding, **kw)
    new.weight.copy_(calls.weights[0].detach())
    if conv.bias is not None:
        new.bias.copy_(conv.bias)
    return new.to(conv.weight.device).train(conv.training)


def freeze_weight_norm_convs(model: nn.Module) -> list[str]:
    """Replace, in place, every conv that normalises its own weight by the plain conv it computes; their names."""
    done = []
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Conv2d) and type(m) is not nn.Conv2d and not m.weight.is_meta:
            new = _plain(m)
            if new is not None:
                set_module(model, name, new)
                done.append(name)
    return done


@contextmanager
def one_input(model: nn.Module):
    """While exporting, `model.forward` takes the image alone (its other parameters at their defaults)."""
    params = list(inspect.signature(model.forward).parameters.values())
    if len(params) <= 1 or "forward" in vars(model):
        yield model
        return
    bound = model.forward
    model.forward = lambda input: bound(input)  # an instance attribute: nn.Module calls it, the exporter reads it
    try:
        yield model
    finally:
        del model.forward
