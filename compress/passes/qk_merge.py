"""Q/K merging (Bermeitinger et al.): one d x d bilinear form per head instead of W_Q and W_K.

`exact` keeps the function: logits_h = x (Wq_h^T Wk_h / sqrt(dh)) x^T plus a key-side bias.
It costs H*d^2 parameters instead of 2*d*d, so it only shrinks models with one head.
"""
from __future__ import annotations

from typing import Literal

from ..modules import MergedQK, SeparateQK
from ..registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, rewrite_attention


class QKMergeConfig(PassConfig):
    mode: Literal["exact"] = "exact"
    blocks: BlockSel = "all"
    allow_growth: bool = False

    def is_exact(self) -> bool:
        return self.mode == "exact"


def merge_qk(score: SeparateQK) -> MergedQK:
    """Build the merged bilinear form in float64, then cast back to the layer's dtype."""
    h, dtype = score.heads, score.q.weight.dtype
    wq = score.q.weight.double().view(h, -1, score.q.in_features)  # (H, dh, d)
    wk = score.k.weight.double().view(h, -1, score.k.in_features)
    weight = score.scale * wq.transpose(1, 2) @ wk  # (H, d, d)
    bias = None
    if score.q.bias is not None:
        bq = score.q.bias.double().view(h, 1, -1)  # (H, 1, dh)
        bias = score.scale * bq @ wk  # (H, 1, d): the key-side term; query-only terms cancel in softmax
    return MergedQK(weight.to(dtype), None if bias is None else bias.to(dtype))


def _cost(score: SeparateQK, tokens: int) -> tuple[int, int, int, int]:
    """(params before, after, FLOPs before, after) of one block's score part."""
    d, a, h = score.q.in_features, score.q.out_features, score.heads
    p0 = sum(p.numel() for p in score.parameters())
    p1 = h * d * d + (h * d if score.q.bias is not None else 0)
    f0 = 2 * (2 * tokens * d * a) + 2 * tokens * tokens * a
    f1 = 2 * h * tokens * d * d + 2 * h * tokens * tokens * d
    return p0, p1, f0, f1


@register_pass("qk_merge", QKMergeConfig, families={"vit"},
               summary="merge W_Q, W_K into one bilinear form per head (exact; shrinks only 1-head models)")
def qk_merge(model, adapter, cfg: QKMergeConfig, ctx: PassContext) -> PassResult:
    return rewrite_attention(model, adapter, cfg, part="score", kind=SeparateQK, convert=merge_qk, cost=_cost,
                             label="qk_merge", verb="merged Q/K")
