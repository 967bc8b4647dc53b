"""Value/output folding and removal (Bermeitinger et al.).

`fold` is exact: W_VO_h = Wv_h^T Wo_h^T, one d x d map per head; rows of A_h sum to one, so
the value bias folds into the output bias. It costs H*d^2 parameters instead of 2*d*d, so it
only shrinks one-head models. `remove` drops V and O: out = (sum_h alpha_h A_h) x + b, with
alpha and b fitted by least squares on calibration data (approximate).
"""
from __future__ import annotations

from typing import Literal

import torch

from ..core.errors import InputError
from ..core.modules import FoldedVO, MergedQK, RemovedVO, SeparateQK, SeparateVO, SymmetricQK
from ..core.probe import capture
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, rewrite_attention, select


class VOConfig(PassConfig):
    mode: Literal["fold", "remove"] = "fold"
    blocks: BlockSel = "all"
    allow_growth: bool = False

    def is_exact(self) -> bool:
        return self.mode == "fold"

    def needs_data(self) -> str | None:
        return "mode remove fits alpha on calibration tokens" if self.mode == "remove" else None


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


@torch.no_grad()
def fit_removed(attn: torch.Tensor, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares for alpha (H,) and b (d,) in (sum_h alpha_h A_h x) + b ~ target, in float64."""
    feats = (attn.double() @ x.double().unsqueeze(1)).transpose(0, 1).reshape(attn.shape[1], -1, x.shape[-1])  # (H, BN, d)
    y = target.double().reshape(-1, x.shape[-1])
    fc, yc = feats - feats.mean(1, keepdim=True), y - y.mean(0)  # centring over tokens separates b from alpha
    gram = torch.einsum("hnd,knd->hk", fc, fc)
    rhs = torch.einsum("hnd,nd->h", fc, yc)
    alpha = torch.linalg.lstsq(gram, rhs.unsqueeze(-1)).solution.squeeze(-1)
    bias = y.mean(0) - torch.einsum("h,hd->d", alpha, feats.mean(1))
    return alpha, bias


def remove_vo(model, adapter, cfg: VOConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    idx = [i for i in select(cfg.blocks, len(blocks), "vo") if isinstance(blocks[i].attn.value, SeparateVO)]
    if ctx.calib is None and ctx.replay is None:
        raise InputError("vo remove fits alpha on calibration data; give the recipe calibration images")
    total_before = sum(p.numel() for p in model.parameters())
    fits = {}
    for i in idx:  # in order, so each block is fitted on the inputs the already-rewritten blocks produce
        value = blocks[i].attn.value
        if value.proj.out_features != value.v.in_features:
            raise InputError(f"vo remove: block {i} maps width {value.v.in_features} to {value.proj.out_features}; "
                             "remove needs equal widths")
        h, d = value.heads, value.v.in_features
        alpha, bias = torch.zeros(h, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        if ctx.replay is None:
            x = capture(model, [blocks[i].attn], ctx.calib, inputs=True)[0]
            a = blocks[i].attn
            if not isinstance(a.score, (SeparateQK, MergedQK, SymmetricQK)):
                raise InputError(f"vo remove: block {i}'s scores ({type(a.score).__name__}) need more than the block "
                                 "input to compute (RoPE); use mode: fold, which stays exact on this model")
            with torch.no_grad():
                logits = a.score(x)
                attn = (a.rel_pos(logits) if a.rel_pos is not None else logits).softmax(-1)
                alpha, bias = fit_removed(attn, x, value(attn, x))
        dtype = value.v.weight.dtype
        blocks[i].attn.value = RemovedVO(alpha.to(dtype), bias.to(dtype))
        fits[str(i)] = [round(float(a), 4) for a in alpha]
    after = sum(p.numel() for p in model.parameters())
    changes = [f"removed V/O in blocks {idx} (alpha fitted by least squares): params {after - total_before:+,}"]
    return PassResult(model, changes, {"blocks": idx, "alpha": fits})


@register_pass("vo", VOConfig, families={"vit", "other"}, vit_blocks=True,
               summary="fold W_V, W_O into one map per head (exact; 1-head models) or remove them (fitted; approximate)")
def vo(model, adapter, cfg: VOConfig, ctx: PassContext) -> PassResult:
    if cfg.mode == "remove":
        return remove_vo(model, adapter, cfg, ctx)
    return rewrite_attention(model, adapter, cfg, part="value", kind=SeparateVO, convert=fold_vo, cost=_cost,
                             label="vo fold", verb="folded V/O")
