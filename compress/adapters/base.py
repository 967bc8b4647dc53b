"""What a pass may ask of a model family: its blocks in neutral form, its input size, a summary."""
from __future__ import annotations

from typing import Protocol

from torch import nn

from ..modules import ViTBlock


class Adapter(Protocol):
    name: str  # e.g. "timm-vit"
    family: str  # "vit" or "resnet": passes declare the families they apply to

    def matches(self, model: nn.Module) -> bool: ...

    def vit_blocks(self, model: nn.Module) -> list[ViTBlock]:
        """The transformer blocks, converted in place to `ViTBlock` on first call (exactly)."""
        ...

    def feature_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs feature distillation matches between teacher and student."""
        ...

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None: ...

    def describe(self, model: nn.Module) -> dict: ...
