"""Block selection and growth accounting shared by the ViT passes."""
from __future__ import annotations

from typing import Annotated, Callable, Literal, Union

import torch
from pydantic import BeforeValidator, NonNegativeInt

from ..core.errors import InputError
from ..core.registry import PassResult


def _blocks(v):
    if v == "all" or (isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)):
        return v
    raise ValueError(f"blocks must be 'all' or a list of block indices 0, 1, ... (got {v!r})")


BlockSel = Annotated[Union[Literal["all"], list[NonNegativeInt]], BeforeValidator(_blocks)]


def _blocks_or_auto(v):
    if v == "auto":
        return v
    try:
        return _blocks(v)
    except ValueError:
        raise ValueError(f"blocks must be 'all', 'auto' or a list of block indices 0, 1, ... (got {v!r})") from None


# One validator for the whole union, so a bad value gets one message, not one per union branch.
BlockSelOrAuto = Annotated[Union[Literal["all", "auto"], list[NonNegativeInt]], BeforeValidator(_blocks_or_auto)]


def select(sel: BlockSel, n: int, where: str) -> list[int]:
    """Resolve `all` or an explicit index list against a model with n blocks."""
    if sel == "all":
        return list(range(n))
    bad = [i for i in sel if i >= n]
    if bad:
        raise InputError(f"{where}.blocks: index {bad[0]} is out of range; this model has {n} blocks (0..{n - 1})")
    if len(set(sel)) != len(sel):
        raise InputError(f"{where}.blocks: {sel} lists a block twice; list each block once")
    return sorted(sel)


def guard_growth(where: str, d_params: int, d_flops: int, total_params: int, heads: int, allow: bool,
                 pays: str | None = None) -> str | None:
    """Refuse a rewrite that makes the model bigger or slower unless the recipe allows it.

    `pays` says when the rewrite would shrink (default: with one head, true of the exact merged forms).
    """
    if d_params <= 0 and d_flops <= 0:
        return None
    msg = (f"{where} would grow the model: params {d_params:+,} ({100 * d_params / total_params:+.1f}%), "
           f"FLOPs {d_flops:+,} per image, with {heads} heads ({pays or 'it pays only with 1 head'})")
    if not allow:
        raise InputError(f"{msg}; set allow_growth: true in the pass to apply it anyway")
    return msg + "; applied because allow_growth: true"


def rewrite_attention(model, adapter, cfg, *, part: str, kind: type, convert: Callable, cost: Callable,
                      label: str, verb: str, pays: Callable | None = None) -> PassResult:
    """Replace the `part` ("score" or "value") of each selected block's attention that is still `kind`.

    `cost(module, tokens)` gives (params before, after, FLOPs before, after) so the growth
    guard can refuse before anything changes.
    """
    blocks = adapter.vit_blocks(model)
    sel = select(cfg.blocks, len(blocks), label)
    idx = [i for i in sel if isinstance(getattr(blocks[i].attn, part, None), kind)]
    stuck = [i for i in sel if getattr(getattr(blocks[i].attn, part, None), "obstacle", None)]
    if stuck and not idx:  # e.g. RoPE scores: say why rather than rewrite nothing
        m = getattr(blocks[stuck[0]].attn, part)
        raise InputError(f"{label}: the attention of blocks {stuck} {m.obstacle} ({type(m).__name__}); lowrank and "
                         "width apply to this model")
    tokens = adapter.describe(model)["tokens"]
    costs = [cost(getattr(blocks[i].attn, part), tokens) for i in idx]
    d_params = sum(c[1] - c[0] for c in costs)
    d_flops = sum(c[3] - c[2] for c in costs)
    heads = getattr(blocks[idx[0]].attn, part).heads if idx else 0
    total = sum(p.numel() for p in model.parameters())
    hint = pays(getattr(blocks[idx[0]].attn, part)) if idx and pays else None
    note = guard_growth(label, d_params, d_flops, total, heads, cfg.allow_growth, hint) if idx else None
    with torch.no_grad():
        for i in idx:
            setattr(blocks[i].attn, part, convert(getattr(blocks[i].attn, part)))
    changes = [f"{verb} in blocks {idx} ({heads} heads): params {d_params:+,}, FLOPs {d_flops:+,}"]
    return PassResult(model, changes + ([note] if note else []), {"blocks": idx, "heads": heads})
