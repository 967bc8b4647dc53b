"""Value/output folding (Bermeitinger et al.): W_VO_h = Wv_h^T Wo_h^T, one d x d map per head.

`fold` is exact: rows of A_h sum to one, so the value bias folds into the output bias.
It costs H*d^2 parameters instead of 2*d*d, so it only shrinks models with one head.
"""
from __future__ import annotations

from typing import Literal

import torch

from ..modules import FoldedVO, SeparateVO
from ..registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, rewrite_attention


class VOConfig(PassConfig):
    mode: Literal["fold"] = "fold"
    blocks: BlockSel = "all"
    allow_growth: bool = False

    def is_exact(self) -> bool:
        return self.mode == "fold"


def fold_vo(value: SeparateVO) -> FoldedVO:
    """Fold in float64, cast back to the layer's dtype."""
    v, o, h = value.v, value.proj, value.heads
    wv = v.weight.double().view(h, -1, v.in_features)  # (H, dh, d)
    wo = o.weight.double().view(o.out_features, h, -1).permute(1, 2, 0)  # (H, dh, d_out)
    weight = wv.transpose(1, 2) @ wo  # (H, d, d_out)
    bias = None
    if v.bias is not None or o.bias is not None:
        bias = torch.zeros(o.out_features, dtype=torch.float64)
        if o.bias is not None:
            bias += o.bias.double()
        if v.bias is not None:
            bias += o.weight.double() @ v.bias.double()
    dtype = v.weight.dtype
    return FoldedVO(weight.to(dtype), None if bias is None else bias.to(dtype))


def _cost(value: SeparateVO, tokens: int) -> tuple[int, int, int, int]:
    d, a, dout, h = value.v.in_features, value.v.out_features, value.proj.out_features, value.heads
    has_bias = value.v.bias is not None or value.proj.bias is not None
    p0 = sum(p.numel() for p in value.parameters())
    p1 = h * d * dout + (dout if has_bias else 0)
    f0 = 2 * tokens * d * a + 2 * tokens * tokens * a + 2 * tokens * a * dout
    f1 = 2 * h * tokens * d * dout + 2 * h * tokens * tokens * dout
    return p0, p1, f0, f1


@register_pass("vo", VOConfig, families={"vit"},
               summary="fold W_V and W_O into one map per head (exact; shrinks only 1-head models)")
def vo(model, adapter, cfg: VOConfig, ctx: PassContext) -> PassResult:
    return rewrite_attention(model, adapter, cfg, part="value", kind=SeparateVO, convert=fold_vo, cost=_cost,
                             label="vo fold", verb="folded V/O")
