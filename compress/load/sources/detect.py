"""Which family a bare weights file belongs to, from its keys (used when the recipe has no model section)."""
from __future__ import annotations

import re

from ...core.errors import InputError

# family -> patterns that must all match some key; checked in this order
SIGNATURES = {
    "timm/torchvision ResNet": (r"conv1\.weight", r"layer1\.0\.conv1\.weight", r"fc\.weight"),
    "torchvision ViT": (r"class_token", r"encoder\.layers\.encoder_layer_0\..+", r"heads\.head\.weight"),
    "timm ViT": (r"patch_embed\.proj\.weight", r"blocks\.0\.attn\.qkv\.weight"),
    "Hugging Face ViT/DeiT": (r"(vit|deit)\.embeddings\..+",),
    "Hugging Face ResNet": (r"resnet\.embedder\..+",),
}
# torchvision / timm names for standard ResNet depths: (block has conv3, blocks per stage) -> name
RESNET_DEPTHS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34", (True, (3, 4, 6, 3)): "resnet50",
                 (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}
TV_VIT_HEADS = {768: "vit_b_16", 1024: "vit_l_16", 1280: "vit_h_14"}  # width -> a torchvision name with that head count


def family_of(sd: dict) -> str | None:
    for family, patterns in SIGNATURES.items():
        if all(any(re.fullmatch(p, k) for k in sd) for p in patterns):
            return family
    return None


def guess_arch(sd: dict, path) -> tuple[str, dict]:
    """(model.arch, kwargs) for a bare weights file whose keys say enough; else one line saying what is missing."""
    family = family_of(sd)
    if family is None:
        keys = sorted(sd)[:4]
        raise InputError(f"{path}: its keys match no known family (candidates: {', '.join(SIGNATURES)}, or your own "
                         f"'package.module:factory'); keys seen: {', '.join(keys)}{', ...' if len(sd) > 4 else ''}; "
                         "add a 'model:' section with arch to the recipe")
    if family == "timm/torchvision ResNet":
        depths = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{s}.")}) for s in range(1, 5))
        name = RESNET_DEPTHS.get((any(".conv3." in k for k in sd), depths))
        if name:
            return f"torchvision:{name}", {}
        raise InputError(f"{path}: a ResNet state dict with {depths} blocks per stage, not a standard depth; "
                         "add a 'model:' section with arch (e.g. timm:NAME) to the recipe")
    if family == "torchvision ViT":
        width = sd["class_token"].shape[-1]
        if width in TV_VIT_HEADS:
            return f"torchvision:{TV_VIT_HEADS[width]}", {}
        raise InputError(f"{path}: a torchvision ViT of width {width}; its head count is not in the weights: add "
                         "model: {arch: torchvision:VisionTransformer, kwargs: {num_heads: N}} to the recipe")
    if family == "timm ViT":
        raise InputError(f"{path}: a timm ViT state dict; its head count and image size are not in the weights: add "
                         "model: {arch: timm:NAME, img_size: N} to the recipe, or pass a timm directory with config.json")
    raise InputError(f"{path}: a {family} state dict without its config.json; pass the model directory "
                     "(config.json + model.safetensors) as saved by save_pretrained")
