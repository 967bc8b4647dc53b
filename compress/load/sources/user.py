"""Your own architecture: `package.module:factory` + a weights file.

ViT-like blocks (two LayerNorms, attention with a fused qkv / separate q, k, v Linears or an
nn.MultiheadAttention, and a two-Linear MLP) become the neutral `ViTBlock`; ResNet-like
blocks (2 or 3 conv+BN pairs and an optional conv+BN shortcut) become timm BasicBlock /
Bottleneck around your own layers. Each block is checked numerically on the inputs it sees
in a forward pass; what cannot be mapped is named, and only block-rewriting passes refuse it.
"""
from __future__ import annotations

import copy
import importlib
import math
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn

from ...adapters.base import set_module
from ...adapters.user import UserAdapter, unmapped_text
from ...core.errors import InputError, VerificationError
from .common import CONVERT_TOL, Converted, LogitsOnly, check_same, fit, logits_of, logits_only, random_input, rel_diff
from .torch_layers import rebuild_torch_layers
from .user_blocks import fit_vit_block, res_block, res_parts, vit_block, vit_parts


def make(arch: str, kwargs: dict, num_classes=None) -> nn.Module:
    mod_name, _, fn_name = arch.partition(":")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:  # the console script does not put the current directory on the path; `python -m` does
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"model.arch '{arch}': cannot import {mod_name} ({e}); run from its folder or add it to PYTHONPATH") from None
    finally:
        if added:
            sys.path.remove(cwd)
    fn = module  # a dotted name reaches a class's factory method: `efficientnet_lite_pytorch:EfficientNet.from_name`
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise InputError(f"model.arch '{arch}': {mod_name} has no callable {fn_name!r}")
    args = {**kwargs, **({"num_classes": num_classes} if num_classes else {})}
    try:
        model = fn(**args)
    except TypeError as e:
        raise InputError(f"model.arch '{arch}': calling {fn_name}(**{args}) failed ({e}); check model.kwargs") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"model.arch '{arch}': {fn_name}() returned {type(model).__name__}, not a torch nn.Module")
    return model.eval()


def _input_size(model: nn.Module, img_size) -> tuple[int, int, int]:
    """Channels from the first conv; the side from model.img_size, else a ViT's position embedding, else 224."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = conv.in_channels if conv is not None else 3
    if img_size:
        return (chans, img_size, img_size)
    if conv is not None and conv.kernel_size == conv.stride and conv.stride[0] > 1:
        embeds = [p for p in model.parameters() if p.dim() == 3 and p.shape[0] == 1 and p.shape[2] == conv.out_channels]
        for p in sorted(embeds, key=lambda p: -p.shape[1]):  # the position embedding is the longest
            for prefix in (0, 1, 2):
                side = math.isqrt(p.shape[1] - prefix)
                if side * side == p.shape[1] - prefix:
                    return (chans, side * conv.stride[0], side * conv.stride[0])
    return (chans, 224, 224)


# ----------------------------------------------------------------------------- conversion

def _inputs(model: nn.Module, names: list[str], input_size) -> dict[str, torch.Tensor]:
    """What each named block receives in a forward pass on seeded random images."""
    seen, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].detach())))
    try:
        with torch.no_grad():
            model(random_input(input_size))
    finally:
        for h in hooks:
            h.remove()
    return seen


def _find(model: nn.Module):
    """('vit', list path, {index: parts}) for the longest block list with ViT-like blocks, else ('resnet', ...)."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)]
    best = None
    for n, m in lists:
        found = {i: p for i, b in enumerate(m) if (p := vit_parts(b)) is not None}
        if 2 * len(found) > len(m) and (best is None or len(m) > len(best[1])):
            best = (n, m, found)
    if best is not None:
        return "vit", best
    res = {n: p for n, m in model.named_modules() if n and (p := res_parts(m)) is not None}
    if not any(isinstance(p, tuple) for p in res.values()):
        return None, res  # reasons only: no block could be mapped
    return "resnet", res


NOT_CALLED = "the model never calls the block itself (its forward calls the block's parts)"


def _block_diff(blk: nn.Module, new: nn.Module, x: torch.Tensor) -> float | str:
    """How far the mapped block is from yours on its real input, or why it cannot even run in its place (a shortcut
    computed in forward that changes the shape, a block that takes more than one input or returns more than one)."""
    try:
        with torch.no_grad():
            ref, got = blk(x), new(x)
    except Exception as e:  # noqa: BLE001 - any failure of the stand-in means: leave your block as it is
        return f"the mapped form does not run in its place: {type(e).__name__}: {str(e).strip()[:80]}"
    if not isinstance(ref, torch.Tensor):
        return f"it returns a {type(ref).__name__}, not a tensor"
    return rel_diff(ref, got)


def convert(model: nn.Module, arch: str, input_size, choices: dict | None = None) -> tuple[UserAdapter, dict]:
    """Convert recognised blocks in place (search and verify, or replay recorded `choices`)."""
    family, found = _find(model)
    if choices is not None and choices.get("family") is None:  # the original run left every block as written
        family, found = None, {}
    if family is None:  # it still loads, exports and distills; only the passes that rewrite blocks refuse it
        kinds = sorted({type(m).__name__ for m in model.modules()} - {"Sequential", "ModuleList", "ModuleDict"})
        unmapped = [f"{n} ({why})" for n, why in (found or {}).items()]
        record = {"family": None, "blocks": {}, "unmapped": unmapped, "tokens": None, "input_size": list(input_size),
                  "module_types": kinds}
        return UserAdapter("other", [], unmapped, input_size, None), record
    unmapped, done, tokens = [], {}, None
    if family == "vit":
        path, blocks, parts = found
        names = [f"{path}.{i}" if path else str(i) for i in range(len(blocks))]
        unmapped = [names[i] for i in range(len(blocks)) if i not in parts]
        xs = _inputs(model, names, input_size) if choices is None else {}
        tokens = next(iter(xs.values())).shape[1] if xs else (choices or {}).get("tokens")
        for i, p in parts.items():
            if choices is not None:
                if names[i] not in choices["blocks"]:
                    continue  # it could not be mapped in the original run either
                how = choices["blocks"][names[i]]
                new = vit_block(p, **how)
            else:
                got = fit_vit_block(blocks[i], xs[names[i]], p) if names[i] in xs else NOT_CALLED
                if isinstance(got, str):
                    unmapped.append(f"{names[i]} ({got})")
                    continue
                new, how = got
            blocks[i], done[names[i]] = new, how
    else:
        unmapped = [f"{n} ({p})" for n, p in found.items() if isinstance(p, str)]
        found = {n: p for n, p in found.items() if not isinstance(p, str)}
        xs = _inputs(model, list(found), input_size) if choices is None else {}
        for n, p in found.items():
            new = res_block(p)
            if choices is None:
                d = _block_diff(model.get_submodule(n), new, xs[n]) if n in xs else NOT_CALLED
                if isinstance(d, str):
                    unmapped.append(f"{n} ({d})")
                    continue
                if not d <= CONVERT_TOL:
                    unmapped.append(f"{n} (differs from conv-BN-ReLU ... + shortcut, then ReLU, by {d:.1e})")
                    continue
            elif n not in choices["blocks"]:
                continue
            set_module(model, n, new)
            done[n] = {}
    mapped = [n for n in done]
    record = {"family": family, "blocks": done, "unmapped": unmapped, "tokens": tokens, "input_size": list(input_size)}
    return UserAdapter(family, mapped, unmapped, input_size, tokens), record


def read(arch: str, kwargs: dict, num_classes, img_size, sd: dict, weights) -> Converted:
    model = make(arch, kwargs, num_classes)
    fit(model, sd, f"{arch}({kwargs or ''})", weights)
    size = _input_size(model, img_size)
    before = {id(t): (k, t) for k, t in model.state_dict(keep_vars=True).items()}  # t kept alive: ids stay unique
    model = logits_only(model, size)  # your keys stay in `before`: the save-back writes them without the wrapper
    returns = model.returns if isinstance(model, LogitsOnly) else None
    original = copy.deepcopy(model)
    torch_layers = rebuild_torch_layers(model, size)
    adapter, record = convert(model, arch, size)
    record["torch_layers"] = torch_layers["rebuilt"]
    try:
        diff = check_same(original, model, size, f"model.arch '{arch}'")
    except Exception as e:  # noqa: BLE001 - each block matched alone, the whole does not (its forward reads them otherwise)
        model = copy.deepcopy(original)
        kinds = sorted({type(m).__name__ for m in model.modules()} - {"Sequential", "ModuleList", "ModuleDict"})
        why = (str(e).partition(": the converted model ")[2].partition(" on random input")[0] if isinstance(e, InputError)
               else f"fails: {type(e).__name__}: {str(e).strip()[:80]}")
        record = {"family": None, "blocks": {}, "unmapped": [f"all blocks (converted, the whole model {why})"],
                  "tokens": None, "input_size": list(size), "module_types": kinds}
        adapter = UserAdapter("other", [], record["unmapped"], size, None)
        torch_layers = {"rebuilt": [], "kept": []}
        before = {id(t): (k.removeprefix("model.") if returns else k, t) for k, t in model.state_dict(keep_vars=True).items()}
        diff = 0.0
    back = _origin(model, before)
    note = (f"blocks {unmapped_text(record['unmapped'])} could not be mapped; passes that rewrite {record['family']} blocks "
            "cannot run on this model" if record["unmapped"] else None)
    if record["family"] is None:
        note = (f"no ViT-like (2 LayerNorms + attention + 2-Linear MLP) or ResNet-like (conv+BN pairs + shortcut) blocks "
                f"recognised (module types seen: {', '.join(record['module_types'][:12])}"
                + (f"; unconverted: {unmapped_text(record['unmapped'])}" if record["unmapped"] else "")
                + "); it loads, exports and distills, passes that rewrite blocks (mlp_strip, qk_merge, vo, ...) cannot "
                "run on it, and width and lowrank look for its layers by tracing and structure")
    converted = (f"{len(adapter.blocks)} {record['family']} blocks converted in place, each checked on its real input; "
                 f"whole model max |Δlogit| {diff:.1e} of the scale" if record["family"] else None)
    rebuilt, kept = torch_layers["rebuilt"], torch_layers["kept"]
    plain = (", ".join(filter(None, [
        f"torch layers {', '.join(rebuilt)} rebuilt as plain modules (each checked on its real input)" if rebuilt else "",
        f"left as torch's: {', '.join(kept)}" if kept else ""])) or None)
    source = {"read_as": f"user:{arch}", "converted": converted, "note": note, "unmapped": record["unmapped"],
              "torch_layers": plain,
              "output": f"forward returns a {returns}; the logits are taken everywhere (one ONNX output)" if returns else None}
    args = {**kwargs, **({"num_classes": num_classes} if num_classes else {})}
    base = {"builder": "user", "arch": arch, "kwargs": args, "conversion": record, **({"returns": returns} if returns else {})}
    shapes = {k: tuple(v.shape) for k, v in sd.items()}

    def save_back(student, staging, x, tol: float) -> dict:
        return _save_back(student, staging, x, tol, arch=arch, kwargs=args, back=back, shapes=shapes)

    return Converted(model, base, {k: v for k, v in source.items() if v is not None},
                     {"input_size": size, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 1.0},
                     save_back, adapter)


def _origin(model: nn.Module, before: dict) -> dict[str, list[tuple[str, int, int, int, int]]]:
    """Converted key -> [(your key, part index, parts, chunk, chunks)]: chunk j of `chunks` of the converted tensor is
    part i of `parts` of yours. Reused tensors map 1:1, a split q/k/v to a third of your fused one, a q/k/v built
    from per-head Linears to all of them."""
    back = {k: [(before[id(t)][0], 0, 1, 0, 1)] for k, t in model.state_dict(keep_vars=True).items() if id(t) in before}
    for n, m in model.named_modules():
        src = getattr(m, "split_from", None)
        if src is not None:
            back[f"{n}.weight"] = [(before[src[0]][0], src[2], src[3], 0, 1)]
            if src[1] is not None:
                back[f"{n}.bias"] = [(before[src[1]][0], src[2], src[3], 0, 1)]
        cat = getattr(m, "concat_from", None)
        if cat is not None:
            back[f"{n}.weight"] = [(before[w][0], 0, 1, j, len(cat)) for j, (w, _) in enumerate(cat)]
            if cat[0][1] is not None:
                back[f"{n}.bias"] = [(before[b][0], 0, 1, j, len(cat)) for j, (_, b) in enumerate(cat)]
    return back


def _save_back(student, staging, x, tol: float, *, arch: str, kwargs: dict, back: dict, shapes: dict) -> dict:
    """model.user.safetensors: the student in your model's own keys, while the structure is unchanged."""
    sd = student.state_dict()
    why = next((f"{k} has no place in {arch}" for k in sd if k not in back), None)
    parts: dict[str, list] = {}
    for k, v in sd.items():
        for old, i, n, j, m in back.get(k, []):
            parts.setdefault(old, [None] * n)[i] = v.detach().chunk(m)[j] if m > 1 else v.detach()
    if why is None and (set(parts) != set(shapes) or any(p is None for ps in parts.values() for p in ps)):
        why = f"{sorted(set(shapes) - set(parts))[:1] or 'a part'} was removed"
    out = {k: (torch.cat(ps) if len(ps) > 1 else ps[0]).contiguous() for k, ps in parts.items()} if why is None else {}
    if why is None and any(tuple(v.shape) != shapes[k] for k, v in out.items()):
        why = "a layer changed shape"
    if why is not None:
        return {"format": f"user:{arch}", "skipped": f"the passes changed the structure ({why}); "
                                                      "model.safetensors + model.onnx hold the result"}
    fresh = make(arch, kwargs)
    fresh.load_state_dict(out, strict=True)
    with torch.no_grad():
        d = rel_diff(logits_of(student(x)), logits_of(fresh(x)))
    if not d <= tol:
        raise VerificationError(f"{arch} with the student's weights differs by {d:.2e} of the logit scale "
                                f"(tolerance {tol:.0e}); not written")
    path = staging / "model.user.safetensors"
    save_file(out, str(path))
    return {"path": path.name, "format": f"user:{arch}", "bytes": path.stat().st_size,
            "parity": {"rel_diff": d, "images": len(x)}}


def rebuild(base: dict) -> tuple[nn.Module, UserAdapter]:
    """The converted structure for load_compressed: factory, then the recorded conversion choices."""
    model = make(base["arch"], base["kwargs"])
    if base.get("returns"):
        model = LogitsOnly(model, base["returns"])
    rec = base["conversion"]
    rebuild_torch_layers(model, tuple(rec["input_size"]), only=rec.get("torch_layers", []))
    adapter, _ = convert(model, base["arch"], tuple(rec["input_size"]), choices=rec)
    adapter.unmapped = rec["unmapped"]
    return model, adapter
