"""CRATE multi-head subspace self-attention (Yu et al.): one basis U_h (d x dh) per head for Q, K and V.

U_h starts as the top dh right singular vectors of the head's stacked [W_Q; W_K; W_V] rows,
scaled so the logits keep their size; the value map's projection onto U_h is folded into the
untied output projection. Attention parameters 2d^2 instead of 4d^2. Approximate.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..core.modules import MSSA, Attention, SeparateQK, SeparateVO
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, select


class CrateConfig(PassConfig):
    mode: Literal["mssa"] = "mssa"
    blocks: BlockSel = "all"

    def is_exact(self) -> bool:
        return False


@torch.no_grad()
def to_mssa(attn: Attention) -> MSSA:
    """Query/key biases are dropped (MSSA has none); the value bias folds exactly into the output bias."""
    q, k, v, o, h = attn.score.q, attn.score.k, attn.value.v, attn.value.proj, attn.score.heads
    d, a = q.in_features, q.out_features
    dh, dtype = a // h, q.weight.dtype
    basis = nn.Linear(d, a, bias=False)
    proj = nn.Linear(a, o.out_features, bias=o.bias is not None or v.bias is not None)
    wproj = torch.empty(o.out_features, a, dtype=torch.float64)
    for i in range(h):
        rows = slice(i * dh, (i + 1) * dh)
        wq, wk, wv = (m.weight[rows].double() for m in (q, k, v))  # (dh, d) each
        u = torch.linalg.svd(torch.cat([wq, wk, wv]), full_matrices=False).Vh[:dh].T  # (d, dh), orthonormal
        # logits x U U^T x^T c^2 ~ x Wq^T Wk x^T: c^2 by least squares on the forms (kept positive)
        c = (torch.trace(u.T @ wq.T @ wk @ u) / dh).clamp_min(1e-3).sqrt()
        basis.weight[rows] = (c * u.T).to(dtype)
        # values x Wv^T ~ (x U c)(U^T Wv^T / c): the dh x dh factor goes into the output projection
        wproj[:, rows] = o.weight[:, rows].double() @ (wv @ u) / c
    proj.weight.copy_(wproj.to(dtype))
    if proj.bias is not None:
        b = o.bias.double() if o.bias is not None else torch.zeros(o.out_features, dtype=torch.float64)
        proj.bias.copy_((b + (o.weight.double() @ v.bias.double() if v.bias is not None else 0)).to(dtype))
    return MSSA(basis, proj, h, attn.attn_drop, attn.proj_drop)


@register_pass("crate", CrateConfig, families={"vit"},
               summary="CRATE MSSA: one basis per head shared by Q, K, V; output projection untied (approximate)")
def crate(model, adapter, cfg: CrateConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    idx = [i for i in select(cfg.blocks, len(blocks), "crate")
           if isinstance(blocks[i].attn, Attention) and type(blocks[i].attn.score) is SeparateQK
           and type(blocks[i].attn.value) is SeparateVO]
    before = sum(p.numel() for p in model.parameters())
    for i in idx:
        blocks[i].attn = to_mssa(blocks[i].attn)
    after = sum(p.numel() for p in model.parameters())
    changes = [f"MSSA attention in blocks {idx} (one basis per head for Q, K, V): params {after - before:+,}"]
    skipped = [i for i in select(cfg.blocks, len(blocks), "crate") if i not in idx]
    if skipped:
        changes.append(f"blocks {skipped} left as they are: their attention was already rewritten")
    return PassResult(model, changes, {"blocks": idx})
