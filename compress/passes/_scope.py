"""`scope: model` for width and lowrank: a budget over the whole model, as a share of the selected layers' cost."""
from __future__ import annotations

from torch import nn

from ..measure.metrics import count_flops


def whole_cost(model: nn.Module, budget: str, size: tuple) -> float:
    """The model's MACs per image (budget flops: the unit the passes cost layers in) or its parameter count."""
    return count_flops(model, size) / 2 if budget == "flops" else sum(p.numel() for p in model.parameters())


def layer_share(target: float, whole: float, selected: float) -> float:
    """The share of `selected` to keep so the model keeps `target` of `whole`, the rest staying as it is."""
    return (target * whole - (whole - selected)) / selected
