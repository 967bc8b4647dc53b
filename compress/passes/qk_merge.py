"""Q/K merging (Bermeitinger et al.): one d x d bilinear form per head instead of W_Q and W_K.

`exact` keeps the function: logits_h = x (Wq_h^T Wk_h / sqrt(dh)) x^T plus a key-side bias;
it costs H*d^2 parameters instead of 2*d*d, so it only shrinks one-head models. `symmetric`
keeps the r largest-|eigenvalue| directions of that form's symmetric part: one d x r
projection shared by Q and K plus a sign vector per head (approximate).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import PositiveInt, model_validator

from ..core.errors import InputError
from ..core.modules import MergedQK, SeparateQK, SymmetricQK
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, rewrite_attention


class QKMergeConfig(PassConfig):
    mode: Literal["exact", "symmetric"] = "exact"
    rank: Optional[PositiveInt] = None  # symmetric only: eigen-directions kept per head
    blocks: BlockSel = "all"
    allow_growth: bool = False

    @model_validator(mode="after")
    def _rank_for_symmetric(self):
        if (self.mode == "symmetric") != (self.rank is not None):
            raise ValueError("rank is required with mode: symmetric and not allowed with mode: exact")
        return self

    def is_exact(self) -> bool:
        return self.mode == "exact"


def _merged64(score) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, d, d) merged form and (H, 1, d) key-side bias in float64, from separate or merged scores."""
    if isinstance(score, MergedQK):
        return score.weight.double(), None if score.bias is None else score.bias.double()
    h = score.heads
    wq = score.q.weight.double().view(h, -1, score.q.in_features)  # (H, dh, d)
    wk = score.k.weight.double().view(h, -1, score.k.in_features)
    weight = score.scale * wq.transpose(1, 2) @ wk  # (H, d, d)
    bias = None
    if score.q.bias is not None:
        bq = score.q.bias.double().view(h, 1, -1)  # (H, 1, dh)
        bias = score.scale * bq @ wk  # (H, 1, d): the key-side term; query-only terms cancel in softmax
    return weight, bias


def merge_qk(score: SeparateQK) -> MergedQK:
    """Build the merged bilinear form in float64, then cast back to the layer's dtype."""
    weight, bias = _merged64(score)
    dtype = score.q.weight.dtype
    return MergedQK(weight.to(dtype), None if bias is None else bias.to(dtype))


def symmetric_qk(score, rank: int) -> SymmetricQK:
    """S = (M + M^T)/2 = V L V^T; keep the `rank` largest |L|: P = V |L|^(1/2), sign = sign(L)."""
    weight, bias = _merged64(score)
    dtype = next(score.parameters()).dtype
    evals, evecs = torch.linalg.eigh((weight + weight.transpose(1, 2)) / 2)  # (H, d), (H, d, d)
    top = evals.abs().topk(rank, dim=-1).indices  # (H, r)
    lam = evals.gather(-1, top)
    vecs = evecs.gather(-1, top.unsqueeze(1).expand(-1, evecs.shape[1], -1))  # (H, d, r)
    proj = vecs * lam.abs().sqrt().unsqueeze(1)
    sign = torch.where(lam < 0, -1.0, 1.0).to(torch.float64).unsqueeze(1)  # (H, 1, r)
    return SymmetricQK(proj.to(dtype), sign.to(dtype), None if bias is None else bias.to(dtype))


def _cost(score: SeparateQK, tokens: int) -> tuple[int, int, int, int]:
    """(params before, after, FLOPs before, after) of one block's score part, merged exactly."""
    d, a, h = score.q.in_features, score.q.out_features, score.heads
    p0 = sum(p.numel() for p in score.parameters())
    p1 = h * d * d + (h * d if score.q.bias is not None else 0)
    f0 = 2 * (2 * tokens * d * a) + 2 * tokens * tokens * a
    f1 = 2 * h * tokens * d * d + 2 * h * tokens * tokens * d
    return p0, p1, f0, f1


def symmetric_cost(score, tokens: int, rank: int) -> tuple[int, int, int, int]:
    """Params H*d*r (+ H*d key-side bias); FLOPs: one projection, then H N x N products of width r."""
    h = score.heads
    if isinstance(score, MergedQK):
        d, has_bias = score.weight.shape[-1], score.bias is not None
        f0 = 2 * h * tokens * d * d + 2 * h * tokens * tokens * d
    else:
        d, has_bias = score.q.in_features, score.q.bias is not None
        f0 = _cost(score, tokens)[2]
    p0 = sum(p.numel() for p in score.parameters())
    p1 = h * d * rank + (h * d if has_bias else 0)
    f1 = 2 * tokens * d * h * rank + 2 * h * tokens * tokens * rank + (2 * tokens * d * h if has_bias else 0)
    return p0, p1, f0, f1


def _pays_below(score) -> int:
    """The rank under which H*d*r parameters undercut the module's current ones."""
    d = score.weight.shape[-1] if isinstance(score, MergedQK) else score.q.in_features
    return sum(p.numel() for p in score.parameters()) // (score.heads * d)


@register_pass("qk_merge", QKMergeConfig, families={"vit", "other"}, vit_blocks=True,
               summary="merge W_Q, W_K per head: exact (shrinks only 1-head models) or symmetric rank r (approximate)")
def qk_merge(model, adapter, cfg: QKMergeConfig, ctx: PassContext) -> PassResult:
    if cfg.mode == "exact":
        return rewrite_attention(model, adapter, cfg, part="score", kind=SeparateQK, convert=merge_qk, cost=_cost,
                                 label="qk_merge", verb="merged Q/K")
    adapter.vit_blocks(model)  # no transformer blocks: their one-line refusal, before the width is asked for
    d = adapter.describe(model)["width"]
    if cfg.rank > d:
        raise InputError(f"qk_merge.rank {cfg.rank} exceeds the model width {d}; use a rank of at most {d}")
    result = rewrite_attention(model, adapter, cfg, part="score", kind=(SeparateQK, MergedQK),
                               convert=lambda s: symmetric_qk(s, cfg.rank),
                               cost=lambda s, n: symmetric_cost(s, n, cfg.rank),
                               label="qk_merge symmetric", verb=f"symmetric Q/K rank {cfg.rank}",
                               pays=lambda s: f"it pays for rank below about {_pays_below(s)}")
    result.details["rank"] = cfg.rank
    return result
