"""Block selection and growth accounting shared by the ViT passes."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import NonNegativeInt

from ..errors import InputError

BlockSel = Union[Literal["all"], list[NonNegativeInt]]


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


def guard_growth(where: str, d_params: int, d_flops: int, total_params: int, heads: int, allow: bool) -> str | None:
    """Refuse a rewrite that makes the model bigger or slower unless the recipe allows it."""
    if d_params <= 0 and d_flops <= 0:
        return None
    msg = (f"{where} would grow the model: params {d_params:+,} ({100 * d_params / total_params:+.1f}%), "
           f"FLOPs {d_flops:+,} per image, with {heads} heads (it pays only with 1 head)")
    if not allow:
        raise InputError(f"{msg}; set allow_growth: true in the pass to apply it anyway")
    return msg + "; applied because allow_growth: true"
