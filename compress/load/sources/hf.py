"""Hugging Face transformers directories (ViT, DeiT, DeiT with teacher, ResNet) -> timm, and back.

The weights are renamed into the timm model with the same maths (checked on random input
against the transformers model), so every adapter and pass applies unchanged. transformers
is imported only here, when an HF checkpoint is read (it takes seconds).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...core.errors import InputError, VerificationError, read_json
from . import hf_any
from .common import Converted, check_same, fit, logits_of, merge_qkv, rel_diff, rename, split_qkv
from .hf_any import from_pretrained, transformers
from .timm_src import build

VIT = {"ViTForImageClassification": ("vit", None, "vit_base_patch16_224"),
       "DeiTForImageClassification": ("deit", "reg_token", "vit_base_patch16_224"),
       "DeiTForImageClassificationWithTeacher": ("deit", "dist_token", "deit_base_distilled_patch16_224")}
SUPPORTED = (*VIT, "ResNetForImageClassification")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def architecture(config: dict, where) -> str:
    archs = config.get("architectures") or []
    found = [a for a in archs if a in SUPPORTED]
    if found:
        return found[0]
    transformers()  # the missing package is named first
    known = hf_any.classes()
    found = [a for a in archs if a in known.values()] or [known[t] for t in [config.get("model_type")] if t in known and not archs]
    if not found:
        what = ", ".join(archs) or f"model_type {config.get('model_type')!r}"
        raise InputError(f"{where}: Hugging Face {what} is not supported (not an image classifier); supported: {', '.join(SUPPORTED)} "
                         "(converted), and every class AutoModelForImageClassification builds (as transformers builds it)")
    return found[0]


def _vit_rules(p: str, extra_token: str | None) -> list:
    old, new = rf"{p}\.encoder\.layer\.(\d+)\.", rf"{p}\.layers\.(\d+)\."  # saved names; transformers 5 module names
    rules = [(rf"{p}\.embeddings\.cls_token", "cls_token"),
             (rf"{p}\.embeddings\.distillation_token", extra_token or ""),
             (rf"{p}\.embeddings\.mask_token", ""),  # only for masked-image pretraining; unused by the classifier
             (rf"{p}\.embeddings\.position_embeddings", "pos_embed"),
             (rf"{p}\.embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
             (rf"{p}\.layernorm\.(weight|bias)", r"norm.\1"),
             (rf"{p}\.pooler\..*", ""),
             (r"(?:cls_)?classifier\.(weight|bias)", r"head.\1"),
             (r"distillation_classifier\.(weight|bias)", r"head_dist.\1")]
    for hf, t in (("query", "q"), ("key", "k"), ("value", "v")):
        rules += [(old + rf"attention\.attention\.{hf}\.(weight|bias)", rf"blocks.\1.attn.{t}.\2"),
                  (new + rf"attention\.{t}_proj\.(weight|bias)", rf"blocks.\1.attn.{t}.\2")]
    for L in (old, new):
        rules += [(L + r"layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
                  (L + r"layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2")]
    return rules + [(old + r"attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
                    (new + r"attention\.o_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
                    (old + r"intermediate\.dense\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
                    (old + r"output\.dense\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
                    (new + r"mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3")]


def _resnet_rules() -> list:
    s = r"resnet\.encoder\.stages\.(\d+)\.layers\.(\d+)\."

    def block(m, tail):
        return f"layer{int(m.group(1)) + 1}.{m.group(2)}.{tail}"

    return [(r"resnet\.embedder\.embedder\.convolution\.weight", "conv1.weight"),
            (r"resnet\.embedder\.embedder\.normalization\.(\w+)", r"bn1.\1"),
            (s + r"shortcut\.convolution\.weight", lambda m: block(m, "downsample.0.weight")),
            (s + r"shortcut\.normalization\.(\w+)", lambda m: block(m, f"downsample.1.{m.group(3)}")),
            (s + r"layer\.(\d+)\.convolution\.weight", lambda m: block(m, f"conv{int(m.group(3)) + 1}.weight")),
            (s + r"layer\.(\d+)\.normalization\.(\w+)", lambda m: block(m, f"bn{int(m.group(3)) + 1}.{m.group(4)}")),
            (r"classifier\.1\.(weight|bias)", r"fc.\1")]


def _vit_base(arch: str, c: dict, sd: dict) -> dict:
    _, token, name = VIT[arch]
    kwargs = {"img_size": c.get("image_size", 224), "patch_size": c.get("patch_size", 16), "in_chans": c.get("num_channels", 3),
              "embed_dim": c["hidden_size"], "depth": c["num_hidden_layers"], "num_heads": c["num_attention_heads"],
              "mlp_ratio": c["intermediate_size"] / c["hidden_size"], "qkv_bias": c.get("qkv_bias", True),
              "num_classes": _num_classes(c, sd)}
    if token == "reg_token":
        kwargs["reg_tokens"] = 1  # plain DeiT: the distillation token is one more prefix token the head ignores
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        kwargs["act_layer"] = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act, act)
    return {"builder": "timm", "name": name, "kwargs": kwargs, "fixups": {"layer_norm_eps": c.get("layer_norm_eps", 1e-12)}}


def _num_classes(c: dict, sd: dict) -> int:
    for k in ("classifier.weight", "cls_classifier.weight", "classifier.1.weight"):
        if k in sd:
            return sd[k].shape[0]
    return len(c.get("id2label") or {}) or 2


def _timm_resnet_form(c: dict) -> bool:
    """timm's ResNet has a 64-channel stem and no downsampling in the first stage; other HF ResNets stand on the
    floor (the transformers model itself), as any other HF image classifier does."""
    return c.get("embedding_size", 64) == 64 and not c.get("downsample_in_first_stage")


def _resnet_base(c: dict, sd: dict, where) -> dict:
    bottleneck = c.get("layer_type", "bottleneck") == "bottleneck"
    hidden = c["hidden_sizes"]
    kwargs = {"layers": list(c["depths"]), "channels": [h // 4 for h in hidden] if bottleneck else list(hidden),
              "in_chans": c.get("num_channels", 3), "num_classes": _num_classes(c, sd)}
    if c.get("hidden_act", "relu") != "relu":
        kwargs["act_layer"] = c["hidden_act"]
    fix = {"stride_in_1x1": True} if bottleneck and c.get("downsample_in_bottleneck") else {}
    return {"builder": "timm", "name": "resnet50" if bottleneck else "resnet18", "kwargs": kwargs, "fixups": fix}


def _side(s) -> int | None:
    return s.get("height", s.get("shortest_edge")) if isinstance(s, dict) else s


def _pretrained_cfg(folder: Path, arch: str, c: dict) -> dict:
    """Preprocessing from preprocessor_config.json, else the defaults of that model's image processor."""
    cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)} if arch.startswith("ViT") else dict(IMAGENET)
    size, crop_pct, p = c.get("image_size", 224), 1.0, {}
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        p = read_json(pp, "repair or delete it")
        cfg.update({k: tuple(p[f"image_{k}"]) for k in ("mean", "std") if p.get(f"image_{k}")})
        resize, crop = _side(p.get("size")), _side(p.get("crop_size")) if p.get("do_center_crop") else None
        size = crop or resize or size
        crop_pct = p.get("crop_pct") or (crop / resize if crop and resize else 1.0)
    cfg["input_size"] = (c.get("num_channels", 3), size, size)
    cfg["interpolation"] = "bicubic" if p.get("resample") == 3 else "bilinear"
    cfg["crop_pct"] = crop_pct
    return cfg


def read(folder: Path, config: dict, weights: Path, sd: dict) -> Converted:
    """An HF directory -> its timm equivalent, checked against transformers on random input."""
    arch = architecture(config, folder / "config.json")
    if arch not in SUPPORTED or (arch not in VIT and not _timm_resnet_form(config)):
        return hf_any.read(folder, config, arch, _pretrained_cfg(folder, arch, config))
    if arch in VIT:
        prefix, token, _ = VIT[arch]
        renamed, origin = rename(sd, _vit_rules(prefix, token), f"Hugging Face {arch}", weights)
        timm_sd, base = merge_qkv(renamed), _vit_base(arch, config, sd)
    else:
        renamed, origin = rename(sd, _resnet_rules(), f"Hugging Face {arch}", weights)
        timm_sd, base = renamed, _resnet_base(config, sd, folder)
    model = build(base)
    fit(model, timm_sd, f"the timm form of {arch} ({base['name']} {base['kwargs']})", weights)
    pcfg = _pretrained_cfg(folder, arch, config)
    original = from_pretrained(arch, folder)  # like with like: the conversion is in float32 too
    diff = check_same(original, model, pcfg["input_size"], f"{folder}: {arch} -> timm {base['name']}")
    source = {"read_as": f"hf:{arch}", "converted": f"weights renamed into timm {base['name']} {base['kwargs']}"
              f"{' + ' + str(base['fixups']) if base['fixups'] else ''}; max |Δlogit| {diff:.1e} of the scale on random input"}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    back = {new: old for new, old in origin.items()}

    def save_back(student, staging: Path, x, tol: float) -> dict:
        return _save_back(student, staging / "hf", x, tol, folder=folder, arch=arch, back=back, shapes=shapes)

    return Converted(model, base, source, pcfg, save_back)


def _save_back(student, out: Path, x, tol: float, *, folder: Path, arch: str, back: dict, shapes: dict) -> dict:
    """Write `out` as an HF directory when the student still has the original's structure; verify it reloads."""
    sd = split_qkv({k: v.detach().contiguous() for k, v in student.state_dict().items()})
    extra = [k for k in sd if k not in back]
    if extra:
        return {"format": f"hf:{arch}", "skipped": f"the passes changed the structure ({extra[0]} has no place in {arch}); "
                           "model.safetensors + model.onnx hold the result"}
    hf = {back[k]: v for k, v in sd.items()}
    missing = [k for k, s in shapes.items() if k not in hf and k in back.values()]
    changed = [k for k, v in hf.items() if tuple(v.shape) != shapes[k]]
    if missing or changed:
        what = f"{missing[0]} was removed" if missing else f"{changed[0]} changed shape"
        return {"format": f"hf:{arch}", "skipped": f"the passes changed the structure ({what}); model.safetensors + model.onnx hold the result"}
    out.mkdir()
    save_file(hf, str(out / "model.safetensors"), metadata={"format": "pt"})
    if (folder / "preprocessor_config.json").is_file():
        shutil.copyfile(folder / "preprocessor_config.json", out / "preprocessor_config.json")
    config = read_json(folder / "config.json", "repair it")
    config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})  # the weights written are float32
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    again = from_pretrained(arch, out)
    with torch.no_grad():
        d = rel_diff(logits_of(student(x)), logits_of(again(x)))
    if not d <= tol:
        shutil.rmtree(out)
        raise VerificationError(f"{out.name}/: {arch}.from_pretrained gives logits {d:.2e} of their scale away from "
                                f"the student (tolerance {tol:.0e}); not written")
    return {"path": out.name, "format": f"hf:{arch}", "bytes": (out / "model.safetensors").stat().st_size,
            "parity": {"rel_diff": d, "images": len(x)}}
