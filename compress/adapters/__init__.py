"""Family adapters; `detect` picks the one that recognises a model."""
from __future__ import annotations

from torch import nn

from ..errors import InputError
from .base import Adapter
from .timm_resnet import TimmResNetAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: list[Adapter] = [TimmViTAdapter(), TimmResNetAdapter()]


def detect(model: nn.Module) -> Adapter:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    raise InputError(f"model class {type(model).__name__} matches no known family "
                     f"(known: {', '.join(a.name for a in ADAPTERS)})")
