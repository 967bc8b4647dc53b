"""What a pass may ask of a model family: its blocks in neutral form, its input size, a summary."""
from __future__ import annotations

from typing import Literal, Protocol

from torch import nn

from ..core.modules import ViTBlock

LayerKind = Literal["attn", "mlp", "conv", "stem", "head"]
# where attention modules keep their head count: timm, torch, vit-pytorch (lucidrains), HF, nanoGPT-style code
HEAD_ATTRS = ("num_heads", "heads", "n_heads", "num_attention_heads", "nhead", "n_head")


def heads_of(m: nn.Module) -> int | None:
    """The module's head count when it keeps one as an int attribute (an attention module), else None."""
    return next((v for a in HEAD_ATTRS if isinstance(v := getattr(m, a, None), int) and not isinstance(v, bool)), None)


class Adapter(Protocol):
    name: str  # e.g. "timm-vit"
    family: str  # "vit" or "resnet": passes declare the families they apply to

    def matches(self, model: nn.Module) -> bool: ...

    def vit_blocks(self, model: nn.Module) -> list[ViTBlock]:
        """The transformer blocks, converted in place to `ViTBlock` on first call (exactly)."""
        ...

    def res_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The residual blocks in torchvision/timm naming, converted in place on first call if needed.

        Each block has conv1, bn1, conv2, bn2 (+ conv3, bn3 for a bottleneck) and `downsample`
        (None or a module); a pass may replace those conv/bn attributes with modules of the
        same signature. Raises InputError for a family without residual conv blocks.
        """
        ...

    def layers(self, model: nn.Module) -> list[tuple[str, LayerKind]]:
        """Qualified names of the Linear / Conv2d layers a pass may rewrite, with their kind.

        ViT: attn (q, k, v, proj of still-separate attention), mlp (fc1, fc2); ResNet: conv
        (convs inside residual blocks, downsample included), stem; both: head. Names are
        valid for `model.get_submodule` after `vit_blocks` / `res_blocks` conversion.
        """
        ...

    def feature_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose outputs feature distillation matches between teacher and student."""
        ...

    def input_size(self, model: nn.Module) -> tuple[int, int, int] | None: ...

    def describe(self, model: nn.Module) -> dict: ...


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` (e.g. 'blocks.3.mlp.fc1', 'layer2.0.conv3')."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
