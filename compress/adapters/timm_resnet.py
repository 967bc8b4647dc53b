"""timm ResNet (BasicBlock and Bottleneck): residual blocks and rewritable layers in torchvision naming."""
from __future__ import annotations

from timm.models.resnet import ResNet
from torch import nn

from ..core.errors import InputError


def resnet_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks of layer1..layer4; timm and torchvision share the conv1/bn1/.../downsample names."""
    return [b for i in range(1, 5) for b in getattr(model, f"layer{i}")]


def resnet_layers(model: nn.Module) -> list[tuple[str, str]]:
    """Plain convs of the stem (conv1, or a deep stem's Sequential) and of the blocks (downsample too); fc."""
    def plain(prefix: str, mod: nn.Module) -> list[str]:
        return [f"{prefix}.{n}" if n else prefix for n, m in mod.named_modules() if type(m) is nn.Conv2d]

    found = [(n, "stem") for n in plain("conv1", model.conv1)]
    for i in range(1, 5):
        for j, blk in enumerate(getattr(model, f"layer{i}")):
            for attr in ("conv1", "conv2", "conv3", "downsample"):
                mod = getattr(blk, attr, None)
                if mod is not None:
                    found += [(n, "conv") for n in plain(f"layer{i}.{j}.{attr}", mod)]
    if type(getattr(model, "fc", None)) is nn.Linear:
        found.append(("fc", "head"))
    return found


class TimmResNetAdapter:
    name = "timm-resnet"
    family = "resnet"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def vit_blocks(self, model):
        raise InputError("a ResNet has no transformer blocks")

    def res_blocks(self, model: ResNet) -> list[nn.Module]:
        return resnet_blocks(model)

    def layers(self, model: ResNet) -> list[tuple[str, str]]:
        return resnet_layers(model)

    def feature_modules(self, model: ResNet) -> list[nn.Module]:
        return [getattr(model, f"layer{i}") for i in range(1, 5)]

    def input_size(self, model: ResNet):
        return None  # any size works; the checkpoint's pretrained_cfg says which it was trained at

    def describe(self, model: ResNet) -> dict:
        stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
        kinds = sorted({type(b).__name__ for s in stages for b in s})
        return {"blocks": sum(len(s) for s in stages), "stages": [len(s) for s in stages],
                "block_type": "/".join(kinds), "num_classes": model.num_classes}
