"""torchvision ResNets (same keys as timm's) and VisionTransformers (renamed into timm), and back."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...core.errors import InputError, VerificationError
from .common import Converted, check_same, fit, logits_of, merge_qkv, rel_diff, rename, split_qkv
from .timm_src import build

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "wide_resnet50_2", "wide_resnet101_2")
VITS = {"vit_b_16": (16, 12, 12, 768, 3072), "vit_b_32": (32, 12, 12, 768, 3072), "vit_l_16": (16, 24, 16, 1024, 4096),
        "vit_l_32": (32, 24, 16, 1024, 4096), "vit_h_14": (14, 32, 16, 1280, 5120), "VisionTransformer": None}
VIT_ARGS = ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 0.875}
L = r"encoder\.layers\.encoder_layer_(\d+)\."
VIT_RULES = [(r"class_token", "cls_token"), (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
             (r"encoder\.pos_embedding", "pos_embed"), (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
             (r"heads\.head\.(weight|bias)", r"head.\1"),
             (L + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"), (L + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
             (L + r"self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
             (L + r"self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
             (L + r"mlp\.(?:0|linear_1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
             (L + r"mlp\.(?:3|linear_2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2")]


def names() -> list[str]:
    return [*RESNETS, *VITS]


def _vit_config(name: str, kwargs: dict, img_size, sd: dict, where) -> dict:
    """Sizes from the arch name, then kwargs, then what the weights say; heads only from name or kwargs."""
    cfg = dict(zip(VIT_ARGS, VITS[name])) if VITS[name] else {}
    unknown = set(kwargs) - {*VIT_ARGS, "image_size"}
    if unknown:
        raise InputError(f"model.kwargs {sorted(unknown)} are not torchvision VisionTransformer sizes; allowed: "
                         f"image_size, {', '.join(VIT_ARGS)}")
    cfg.update(kwargs)
    if "heads.pre_logits.weight" in sd:
        raise InputError(f"{where}: torchvision ViT with representation_size (pre_logits) is not supported")
    need = ("class_token", "conv_proj.weight", "encoder.pos_embedding", "heads.head.weight")
    if any(k not in sd for k in need):
        raise InputError(f"{where}: not a torchvision VisionTransformer state dict (missing "
                         f"{', '.join(k for k in need if k not in sd)})")
    cfg["hidden_dim"] = sd["class_token"].shape[-1]
    cfg["patch_size"] = sd["conv_proj.weight"].shape[-1]
    cfg["num_layers"] = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
    fc1 = next(v for k, v in sd.items() if k.endswith(("mlp.0.weight", "mlp.linear_1.weight")))
    cfg["mlp_dim"] = fc1.shape[0]
    side = math.isqrt(sd["encoder.pos_embedding"].shape[1] - 1)
    cfg["image_size"] = img_size or cfg.get("image_size") or side * cfg["patch_size"]
    if "num_heads" not in cfg:
        raise InputError(f"{where}: the number of heads is not in the weights; set model.kwargs.num_heads")
    cfg["num_classes"] = sd["heads.head.weight"].shape[0]
    return cfg


def read(name: str, kwargs: dict, num_classes, img_size, sd: dict, weights: Path) -> Converted:
    import torchvision

    if name not in VITS and name not in RESNETS:
        raise InputError(f"model.arch 'torchvision:{name}' is not supported; supported: {', '.join(names())}")
    if name in RESNETS:
        if kwargs:
            raise InputError(f"model.kwargs {sorted(kwargs)}: torchvision ResNets take only num_classes here")
        nc = num_classes or (sd["fc.weight"].shape[0] if "fc.weight" in sd else 1000)
        original = getattr(torchvision.models, name)(weights=None, num_classes=nc)
        fit(original, sd, f"torchvision {name}", weights)
        base = {"builder": "timm", "name": name, "kwargs": {"num_classes": nc}, "fixups": {}}
        timm_sd, origin, size = sd, {k: k for k in sd}, img_size or 224
        how = "same keys as timm"
    else:
        cfg = _vit_config(name, kwargs, img_size, sd, weights)
        original = torchvision.models.VisionTransformer(**cfg)
        sd = {k.replace("mlp.linear_1.", "mlp.0.").replace("mlp.linear_2.", "mlp.3."): v for k, v in sd.items()}
        fit(original, sd, f"torchvision VisionTransformer {cfg}", weights)
        timm_sd, origin = rename(sd, VIT_RULES, "torchvision VisionTransformer", weights)
        base = {"builder": "timm", "name": "vit_base_patch16_224", "fixups": {},
                "kwargs": {"img_size": cfg["image_size"], "patch_size": cfg["patch_size"], "embed_dim": cfg["hidden_dim"],
                           "depth": cfg["num_layers"], "num_heads": cfg["num_heads"], "num_classes": cfg["num_classes"],
                           "mlp_ratio": cfg["mlp_dim"] / cfg["hidden_dim"], "qkv_bias": True}}
        size, how = cfg["image_size"], "weights renamed into timm"
    model = build(base)
    fit(model, timm_sd, f"the timm form of torchvision {name} ({base['name']} {base['kwargs']})", weights)
    diff = check_same(original, model, (3, size, size), f"{weights}: torchvision {name} -> timm {base['name']}")
    source = {"read_as": f"torchvision:{name}", "converted": f"{how} {base['name']} {base['kwargs']}; max |Δlogit| "
              f"{diff:.1e} of the scale on random input"}
    back = {new: old for new, old in origin.items()}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}

    def save_back(student, staging: Path, x, tol: float) -> dict:
        return _save_back(student, staging, x, tol, original=original, name=name, back=back, shapes=shapes)

    return Converted(model, base, source, {**IMAGENET, "input_size": (3, size, size)}, save_back)


def _save_back(student, staging: Path, x, tol: float, *, original, name: str, back: dict, shapes: dict) -> dict:
    """torchvision keys: a ResNet's model.safetensors already has them; a ViT gets model.torchvision.safetensors."""
    sd = merge_qkv(split_qkv({k: v.detach().contiguous() for k, v in student.state_dict().items()}))
    if set(sd) != set(back) or any(tuple(v.shape) != shapes[back[k]] for k, v in sd.items()):
        odd = sorted(set(sd) ^ set(back))
        return {"format": f"torchvision:{name}", "skipped": f"the passes changed the structure ({odd[0] if odd else 'a shape changed'}); "
                           f"torchvision.models.{name} cannot hold it; model.safetensors + model.onnx hold the result"}
    tv = {back[k]: v for k, v in sd.items()}
    original.load_state_dict(tv, strict=True)
    with torch.no_grad():
        d = rel_diff(logits_of(student(x)), logits_of(original.eval()(x)))
    if not d <= tol:
        raise VerificationError(f"torchvision {name} with the student's weights differs by {d:.2e} of the logit scale "
                                f"(tolerance {tol:.0e}); not written")
    if name in RESNETS:
        return {"path": "model.safetensors", "format": f"torchvision:{name}", "parity": {"rel_diff": d, "images": len(x)},
                "note": "same keys: torchvision loads model.safetensors as it is"}
    path = staging / "model.torchvision.safetensors"
    save_file(tv, str(path))
    return {"path": path.name, "format": f"torchvision:{name}", "bytes": path.stat().st_size,
            "parity": {"rel_diff": d, "images": len(x)}}
