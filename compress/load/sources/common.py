"""Shared by the family readers: strict weight fitting, key renaming, numeric equivalence checks."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...core.errors import InputError
from ...measure.metrics import rel_max_diff

CONVERT_TOL = 1e-4  # max |Δ| / max |ref| between an original model (or block) and its conversion


def fit(model: nn.Module, sd: dict, what: str, path: Path | str, assign: bool = False) -> None:
    """load_state_dict(strict) with a one-line summary of every mismatch; `assign` adopts sd's tensors
    as the model's (no copy: for a model built on the meta device)."""
    own = model.state_dict()
    if set(sd) != set(own):  # the reader stripped a wrapper prefix that this model's own keys do have
        for p in ("model.", "module.", "_orig_mod."):
            if {p + k for k in sd} == set(own):
                sd = {p + k: v for k, v in sd.items()}
                break
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {list(sd[k].shape)} vs {list(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch (checkpoint vs model)", shapes)):
            if items:
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}")
        raise InputError(f"weights in {path} do not fit {what}: {'; '.join(parts)}; "
                         "check model.arch, num_classes, img_size and kwargs")
    model.load_state_dict(sd, strict=True, assign=assign)


def rename(sd: dict, rules: list, what: str, path) -> tuple[dict, dict]:
    """Rename every key by the first rule (regex fullmatch -> template or function of the match).

    Returns the renamed dict and {new key: old key}. An empty template drops the key (an
    unused mask token); a key no rule matches is an error naming it.
    """
    out, origin, left = {}, {}, []
    for k, v in sd.items():
        for pat, repl in rules:
            m = re.fullmatch(pat, k)
            if m:
                new = m.expand(repl) if isinstance(repl, str) else repl(m)
                if new:
                    out[new], origin[new] = v, k
                break
        else:
            left.append(k)
    if left:
        raise InputError(f"{path}: {len(left)} keys do not fit a {what} ({', '.join(left[:3])}"
                         f"{', ...' if len(left) > 3 else ''}); is it really that family?")
    return out, origin


def merge_qkv(sd: dict) -> dict:
    """Separate q, k, v (HF) -> one fused qkv (timm), rows in q, k, v order."""
    out = dict(sd)
    for k in sd:  # a block whose attention a pass rewrote (e.g. crate: no v) keeps its keys, so it shows as changed
        parts = [k.replace(".attn.q.", f".attn.{t}.") for t in "qkv"] if ".attn.q." in k else []
        if parts and all(p in sd for p in parts):
            out[k.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(p) for p in parts])
    return out


def split_qkv(sd: dict) -> dict:
    """The inverse, from timm's fused qkv or from the neutral ViTBlock's separate parts."""
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:
            for t, part in zip("qkv", v.chunk(3)):
                out[k.replace(".qkv.", f".{t}.")] = part
        else:
            for a, b in ((".attn.score.q.", ".attn.q."), (".attn.score.k.", ".attn.k."),
                         (".attn.value.v.", ".attn.v."), (".attn.value.proj.", ".attn.proj.")):
                k = k.replace(a, b)
            out[k] = v
    return out


def logits_of(out) -> torch.Tensor:
    """The logits of a model output: a tensor, a transformers output or a dict (`logits`), or the first of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):  # a dict or a transformers ModelOutput
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    kind = f"dict with keys {', '.join(map(str, list(out)[:6]))}" if isinstance(out, dict) else type(out).__name__
    raise InputError(f"the model returned a {kind}, not a tensor of logits (nor a tuple/list starting with one, nor "
                     "a dict or output with 'logits'); make its forward return the logits")


class LogitsOnly(nn.Module):
    """A model whose forward returns more than the logits, reduced to them: calibration, distillation, evaluation and
    export then see one tensor, and the ONNX file has one output. Its weights are the wrapped model's ('model.' + key)."""

    def __init__(self, model: nn.Module, returns: str):
        super().__init__()
        self.model, self.returns = model, returns  # `returns` says what the original forward gave, for the report

    def forward(self, x):
        return logits_of(self.model(x))


def returns_of(model: nn.Module, input_size) -> str | None:
    """What the model's forward returns on a probe batch, when that is not a plain tensor (None when it is)."""
    with torch.no_grad():
        out = model.eval()(random_input(input_size, batch=1))
    if isinstance(out, torch.Tensor):
        return None
    logits_of(out)  # anything without logits in it is refused here, in one line
    if isinstance(out, dict) or hasattr(out, "logits"):
        return f"{type(out).__name__} with 'logits'"
    return f"{type(out).__name__} of {len(out)}, logits first"


def logits_only(model: nn.Module, input_size) -> nn.Module:
    """`model` itself when its forward returns a tensor, else wrapped in LogitsOnly (done once, at load time)."""
    returns = returns_of(model, input_size)
    return model if returns is None else LogitsOnly(model, returns).eval()


def rel_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    """`rel_max_diff`, with a shape mismatch counted as an infinite difference (a candidate mapping that does not fit)."""
    return rel_max_diff(ref, got) if ref.shape == got.shape else float("inf")


def random_input(input_size, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *input_size), generator=g)


def check_same(original: nn.Module, converted: nn.Module, input_size, what: str) -> float:
    """Run both on the same seeded random images; refuse the conversion if the logits differ."""
    x = random_input(input_size)
    with torch.no_grad():
        ref, got = logits_of(original.eval()(x)), logits_of(converted.eval()(x))
    d = rel_diff(ref, got)
    if not d <= CONVERT_TOL:
        raise InputError(f"{what}: the converted model differs from the original by {d:.2e} of the logit scale "
                         f"(tolerance {CONVERT_TOL:.0e}) on random input; this layout variant is not supported, "
                         "please report it with the checkpoint's config")
    return d


class Converted:
    """A checkpoint of another family turned into the timm form the adapters and passes know.

    `base` rebuilds the same structure without the original library (recorded in the
    metadata for load_compressed); `source` says what was read and how it was converted;
    `pretrained_cfg` gives preprocessing; `save_back(student, staging, x, tol)` writes the
    student in the original family's layout, or returns why it cannot. `adapter` is set
    where the model needs its own (user architectures); otherwise the registry detects one.
    """

    def __init__(self, model: nn.Module, base: dict, source: dict, pretrained_cfg: dict | None = None,
                 save_back=None, adapter=None):
        self.model, self.base, self.source = model, base, source
        self.pretrained_cfg, self.save_back, self.adapter = pretrained_cfg, save_back, adapter
