"""Export-time fusion: a block's separate q, k and v Linears run as one MatMul in the ONNX file.

Passes keep q, k and v apart (each narrows or merges on its own); the shipped graph need not. On the shared
ViT at half width, 2 onnxruntime threads, batch 8, one fused MatMul instead of three (and one Add, one
transpose fewer per block) took the student from 1.47x to 1.54x the teacher (1 thread: 1.70x to 1.72x): per-op
overhead is what narrow layers do not shrink. The swap is undone after the export; outputs are unchanged
(the export's parity check runs on the file).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..core.modules import Attention, SeparateQK, SeparateVO


class FusedQKVAttention(nn.Module):
    """Attention(SeparateQK, SeparateVO) with qkv = one Linear; the same function, for the exported graph only."""

    def __init__(self, attn: Attention):
        super().__init__()
        s, v = attn.score, attn.value
        self.heads, self.dq, self.dv, self.scale = s.heads, s.q.out_features, v.v.out_features, s.scale
        w = torch.cat([s.q.weight, s.k.weight, v.v.weight]).detach()
        b = torch.cat([lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=w.dtype)
                       for lin in (s.q, s.k, v.v)]).detach()
        self.qkv = nn.Linear(w.shape[1], w.shape[0], device="meta")
        self.qkv.weight, self.qkv.bias = nn.Parameter(w, requires_grad=False), nn.Parameter(b, requires_grad=False)
        self.proj, self.attn_drop, self.proj_drop = v.proj, attn.attn_drop, attn.proj_drop

    def qkv_heads(self, x):
        """q, k, v as (B, H, N, dh); token merging (core/merging.py) reads k from here."""
        b, n, _ = x.shape
        h, dq, dv = self.heads, self.dq, self.dv
        qkv = self.qkv(x)
        if dq == dv:  # timm's form: one reshape and one transpose for all three
            return qkv.reshape(b, n, 3, h, dq // h).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(t.reshape(b, n, h, t.shape[-1] // h).transpose(1, 2) for t in qkv.split([dq, dq, dv], -1))

    def output(self, attn, v):
        """proj of the heads' attention-weighted values, attn: (B, H, N, N) after softmax."""
        o = self.attn_drop(attn) @ v
        b, h, n, dh = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, h * dh)))

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        q, k, v = self.qkv_heads(x)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
        return self.output(logits.softmax(dim=-1), v)


def _fusable(m: nn.Module) -> bool:
    if not (isinstance(m, Attention) and isinstance(m.score, SeparateQK) and isinstance(m.value, SeparateVO)):
        return False
    q, k, v = m.score.q, m.score.k, m.value.v
    return (all(type(lin) is nn.Linear for lin in (q, k, v)) and q.in_features == k.in_features == v.in_features
            and m.score.heads == m.value.heads and len({lin.weight.dtype for lin in (q, k, v)}) == 1)


@contextmanager
def fused_qkv(model: nn.Module):
    """Within the block, every fusable attention of `model` runs as FusedQKVAttention; put back afterwards."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _fusable(child):
                setattr(parent, name, FusedQKVAttention(child))
                swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
