"""timm models by name, and the timm form other families are converted to (with recorded fix-ups)."""
from __future__ import annotations

import difflib

import timm
from torch import nn

from ...core.errors import InputError


def create(name: str, num_classes, img_size, kwargs: dict) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise InputError(f"unknown timm architecture '{name}'{hint}; see timm.list_models()")
    args = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if img_size is not None:
        args["img_size"] = img_size
    try:
        try:
            return timm.create_model(name, pretrained=False, **args)
        except TypeError as e:
            if img_size is None or "img_size" not in str(e):
                raise
            args.pop("img_size")  # convnets take any size: img_size then only sets the input size
            return timm.create_model(name, pretrained=False, **args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise InputError(f"cannot build timm '{name}' with {args}: {e}; check model kwargs") from None


def build(base: dict) -> nn.Module:
    """The timm model a conversion produced: `base` = {name, kwargs, fixups} as recorded in the metadata.

    Fix-ups cover what timm's constructors cannot say: LayerNorm eps (HF uses 1e-12) and
    a bottleneck's stride on its first 1x1 conv (HF `downsample_in_bottleneck`).
    """
    model = create(base["name"], None, None, base.get("kwargs", {}))
    fix = base.get("fixups", {})
    if "layer_norm_eps" in fix:
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = fix["layer_norm_eps"]
    if fix.get("stride_in_1x1"):
        for m in model.modules():
            if hasattr(m, "conv3") and m.conv2.stride != (1, 1):
                m.conv1.stride, m.conv2.stride = m.conv2.stride, (1, 1)
    return model.eval()
