"""Token merging (ToMe, Bolya et al. ICLR 2023): fewer tokens in later blocks, so every per-token op shrinks.

Width leaves LayerNorms, softmax, GELU and residual adds at full size; merging tokens shrinks all of them. In each
chosen block, between attention and MLP, r tokens are merged by bipartite soft matching on the keys
(core/merging.py), and the following blocks use size-weighted ("proportional") attention. Class, distillation and
register tokens (the prefix) are never merged. Each block's r is fixed, so every token count is known at export.

Config: exactly one of `r` (tokens per chosen block), `schedule` (r per block of the model) or `target` (share of
the FLOPs kept; the same r everywhere, one more in the first blocks to come close). Exact only with r = 0 everywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field, NonNegativeInt, model_validator
from torch import nn

from ..core.errors import InputError
from ..core.merging import MergingBlock, max_r, mergeable, prefix_tokens
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ..measure.metrics import count_flops
from ._blocks import BlockSel, select


class TokenMergeConfig(PassConfig):
    r: Optional[NonNegativeInt] = None
    schedule: Optional[list[NonNegativeInt]] = None  # r of every block of the model, in order
    target: Optional[float] = Field(None, gt=0, le=1)  # share of the model's FLOPs kept
    blocks: BlockSel = "all"  # where r or target merges; not with schedule
    prefix: Optional[NonNegativeInt] = None  # tokens never merged; default: the model's class/dist/register tokens

    @model_validator(mode="after")
    def _one_way(self):
        given = [k for k in ("r", "schedule", "target") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of r (tokens per block), schedule (r per block) or target (FLOP share "
                             f"kept){'; got ' + ', '.join(given) if given else ''}")
        if self.schedule is not None and self.blocks != "all":
            raise ValueError("blocks is not allowed with schedule (it lists r for every block, 0 where none merge)")
        return self

    def is_exact(self) -> bool:
        return self.r == 0 or (self.schedule is not None and not any(self.schedule))


def counts(tokens: int, prefix: int, rs: list[int]) -> tuple[list[int], list[int]]:
    """(r each block can take, tokens after every block) for asked r's, each clamped to ToMe's bound."""
    got, after = [], []
    for r in rs:
        r = min(r, max_r(tokens, prefix))
        tokens -= r
        got.append(r)
        after.append(tokens)
    return got, after


def _install(model, blocks: list, rs: list[int], prefix: int) -> list:
    """Every block becomes a MergingBlock (r = 0 where none merge: they still weigh merged tokens by size)."""
    state: dict = {}
    owner = _container(model, blocks)
    out = []
    for i, (b, r) in enumerate(zip(blocks, rs)):
        m = MergingBlock(b, r, prefix, state, first=i == 0, last=i == len(blocks) - 1)
        owner[i] = m
        out.append(m)
    return out


def _container(model, blocks: list):
    """The ModuleList / Sequential that holds the blocks, in order."""
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) == len(blocks) and \
                all(m[i] is b for i, b in enumerate(blocks)):
            return m
    raise InputError("token_merge: the transformer blocks are not one list of the model; token_merge needs them in "
                     "order in one ModuleList or Sequential")


def _spread(level: int, sel: list[int], n: int) -> list[int]:
    """r per block for `level` merges in all: the same r in every chosen block, one more in the first level % k."""
    rs = [0] * n
    k = len(sel)
    for j, i in enumerate(sel):
        rs[i] = level // k + (1 if j < level % k else 0)
    return rs


def _for_target(model, blocks, sel, prefix, tokens, size, target: float) -> tuple[list[int], float]:
    """The fewest merges whose FLOPs are at most `target` of the model's (binary search on the total merged)."""
    f0 = count_flops(model, size)

    def flops(level):
        for b, r in zip(blocks, counts(tokens, prefix, _spread(level, sel, len(blocks)))[0]):
            b.r = r
        return count_flops(model, size)

    lo, hi = 0, max_r(tokens, prefix) * len(sel)
    if flops(hi) > target * f0:
        return counts(tokens, prefix, _spread(hi, sel, len(blocks)))[0], flops(hi) / f0
    while lo < hi:
        mid = (lo + hi) // 2
        if flops(mid) <= target * f0:
            hi = mid
        else:
            lo = mid + 1
    return counts(tokens, prefix, _spread(lo, sel, len(blocks)))[0], flops(lo) / f0


def _probe(model, adapter) -> None:
    """One image through the merged model: a block called with what merging cannot take (a position bias shared by
    all blocks, BEiT's) is refused here in one line, not in the middle of the pipeline."""
    p = next(model.parameters())
    size = adapter.input_size(model)
    if size is None:
        return
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *size), dtype=p.dtype))
    except NotImplementedError as e:
        raise InputError(f"token_merge: the model's forward gives its blocks {e}, which merged tokens no longer "
                         "fit; use width or lowrank on this model") from None
    finally:
        model.train(was)


@register_pass("token_merge", TokenMergeConfig, families={"vit", "other"}, vit_blocks=True,
               summary="merge r similar tokens per block (ToMe), size-weighted; fewer tokens shrink every per-token op "
                       "(approximate; exact at r = 0)")
def token_merge(model, adapter, cfg: TokenMergeConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    if any(isinstance(b, MergingBlock) for b in blocks):
        raise InputError("token_merge: this model already merges tokens; use one token_merge pass per recipe")
    for i, b in enumerate(blocks):
        why = mergeable(b)
        if why:
            raise InputError(f"token_merge: block {i} {why}")
    info = adapter.describe(model)
    tokens = int(info["tokens"])
    prefix = cfg.prefix if cfg.prefix is not None else prefix_tokens(model, tokens)
    if prefix >= tokens:
        raise InputError(f"token_merge.prefix {prefix} leaves none of the model's {tokens} tokens to merge; "
                         f"set prefix below {tokens}")
    n = len(blocks)
    if cfg.schedule is not None and len(cfg.schedule) != n:
        raise InputError(f"token_merge.schedule lists {len(cfg.schedule)} values; this model has {n} blocks: give "
                         "one r per block (0 where none merge)")
    notes = []
    if ctx.replay is not None and "r" in ctx.replay:
        rs = list(ctx.replay["r"])
    elif cfg.schedule is not None:
        rs = list(cfg.schedule)
    else:
        sel = select(cfg.blocks, n, "token_merge")
        rs = [cfg.r if i in sel else 0 for i in range(n)] if cfg.r is not None else None
    merged = _install(model, blocks, [0] * n, prefix)
    if rs is None:
        size = adapter.input_size(model)
        rs, share = _for_target(model, merged, sel, prefix, tokens, size, cfg.target)
        notes.append(f"target {cfg.target:g} of the FLOPs: r {sorted(set(r for r in rs if r))} in blocks {sel}, "
                     f"{share:.3f} of the FLOPs kept")
    got, after = counts(tokens, prefix, rs)
    if got != rs:
        notes.append(f"r clamped to at most half the mergeable tokens of each block: asked {rs}, merging {got}")
    for b, r, n in zip(merged, got, [tokens, *after]):
        b.r, b.match.tokens = r, n
    _probe(model, adapter)
    notes.append(f"{sum(got)} of {tokens - prefix} mergeable tokens merged ({prefix} prefix tokens kept); tokens after "
                 f"each block: {after}")
    return PassResult(model, notes, {"r": got, "prefix": prefix, "tokens_in": tokens, "tokens": after})
