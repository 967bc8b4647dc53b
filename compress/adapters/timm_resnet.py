"""timm ResNet (BasicBlock and Bottleneck). No ResNet pass ships yet; the adapter describes the model."""
from __future__ import annotations

from timm.models.resnet import ResNet
from torch import nn

from ..errors import InputError


class TimmResNetAdapter:
    name = "timm-resnet"
    family = "resnet"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def vit_blocks(self, model):
        raise InputError("a ResNet has no transformer blocks")

    def feature_modules(self, model: ResNet) -> list[nn.Module]:
        return [getattr(model, f"layer{i}") for i in range(1, 5)]

    def input_size(self, model: ResNet):
        return None  # any size works; the checkpoint's pretrained_cfg says which it was trained at

    def describe(self, model: ResNet) -> dict:
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
        kinds = sorted({type(b).__name__ for s in stages for b in s})
        return {"blocks": sum(len(s) for s in stages), "stages": [len(s) for s in stages],
                "block_type": "/".join(kinds), "num_classes": model.num_classes}
