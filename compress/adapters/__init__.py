"""Family adapters; `detect` picks the one that recognises a model, else the generic floor."""
from __future__ import annotations

from torch import nn

from .base import Adapter
from .generic import GenericAdapter
from .timm_resnet import TimmResNetAdapter
from .timm_vit import TimmViTAdapter

ADAPTERS: list[Adapter] = [TimmViTAdapter(), TimmResNetAdapter()]


def detect(model: nn.Module) -> Adapter:
    """The family adapter that recognises `model`; a model no family knows still loads, exports, distills and
    takes layer-level passes (GenericAdapter); only the passes that rewrite blocks refuse it."""
    return next((a for a in ADAPTERS if a.matches(model)), GENERIC)


GENERIC = GenericAdapter()
