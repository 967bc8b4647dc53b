"""Block recognition for user architectures: ViT-like and ResNet-like blocks by structure, mapped numerically."""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from ...adapters.base import heads_of
from ...core.modules import Attention, SeparateQK, SeparateVO, ViTBlock
from .common import CONVERT_TOL, rel_diff

ACTS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU}


# ----------------------------------------------------------------------------- ViT-like blocks

def split(w: torch.Tensor, b, parts: int) -> list[nn.Linear]:
    out = []
    for i, wi in enumerate(w.chunk(parts)):
        lin = nn.Linear(wi.shape[1], wi.shape[0], bias=b is not None)
        lin.split_from = (id(w), id(b) if b is not None else None, i, parts)  # for saving back in your layout
        if parts == 1 and getattr(w, "split_from", None) is not None:  # itself a part of yours (torch_layers' q, k, v)
            lin.split_from = w.split_from
        lin.weight.split_from = lin.split_from
        lin.weight.data.copy_(wi)
        if b is not None:
            lin.bias.data.copy_(b.chunk(parts)[i])
        out.append(lin)
    return out


def concat(lins: list[nn.Linear]) -> nn.Linear:
    """One Linear whose outputs are those of `lins` in order (per-head projections -> one q, k or v)."""
    w = torch.cat([l.weight.detach() for l in lins])
    b = torch.cat([l.bias.detach() for l in lins]) if all(l.bias is not None for l in lins) else None
    if b is None and any(l.bias is not None for l in lins):
        return None
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    out.concat_from = [(id(l.weight), id(l.bias) if l.bias is not None else None) for l in lins]  # for saving back
    out.weight.data.copy_(w)
    if b is not None:
        out.bias.data.copy_(b)
    return out


def per_head_parts(m: nn.Module, d: int):
    """(q, k, v, proj, heads) of an attention written as a list of heads, each with its own q, k, v Linears."""
    heads = next((c for c in m.children() if isinstance(c, nn.ModuleList) and len(c)), None)
    proj = [c for c in m.children() if isinstance(c, nn.Linear) and c.in_features == d == c.out_features]
    if heads is None or len(proj) != 1:
        return None
    per = [[c for c in h.children() if isinstance(c, nn.Linear)] for h in heads]
    hd = d // len(heads)
    if hd * len(heads) != d or any(len(p) != 3 or any(l.in_features != d or l.out_features != hd for l in p) for p in per):
        return None
    q, k, v = (concat([p[i] for p in per]) for i in range(3))
    return (q, k, v, proj[0], len(heads)) if None not in (q, k, v) else None


def attention_parts(m: nn.Module, d: int):
    """(q, k, v, proj, heads or None) of an attention module, or None if it does not look like one."""
    mha = m if isinstance(m, nn.MultiheadAttention) else next((c for c in m.children() if isinstance(c, nn.MultiheadAttention)), None)
    if mha is not None and mha.in_proj_weight is not None and mha.embed_dim == d:
        return (*split(mha.in_proj_weight, mha.in_proj_bias, 3), mha.out_proj, mha.num_heads)
    lins = [c for c in m.children() if isinstance(c, nn.Linear)]
    heads = heads_of(m)
    fused = [c for c in lins if c.in_features == d and c.out_features == 3 * d]
    square = [c for c in lins if c.in_features == d and c.out_features == d]
    if len(fused) == 1 and len(square) == 1:
        return (*split(fused[0].weight, fused[0].bias, 3), square[0], heads)
    if len(lins) == 4 and len(square) == 4:  # q, k, v, out in the order they were defined
        return (*split(square[0].weight, square[0].bias, 1), *split(square[1].weight, square[1].bias, 1),
                *split(square[2].weight, square[2].bias, 1), square[3], heads)
    return per_head_parts(m, d)


def vit_parts(blk: nn.Module):
    """(norm1, norm2, attention parts, fc1, fc2) of a ViT-like block, or None."""
    norms = [c for c in blk.children() if isinstance(c, nn.LayerNorm)]
    if len(norms) != 2:
        return None
    d = norms[0].normalized_shape[0]
    others = [c for c in blk.children() if not isinstance(c, (nn.LayerNorm, nn.Dropout, nn.Identity))]
    attn = next(((c, p) for c in others if (p := attention_parts(c, d))), None)
    mlps = [[m for m in c.modules() if isinstance(m, nn.Linear)] for c in others if attn and c is not attn[0]]
    mlp = next((l for l in mlps if len(l) == 2 and l[0].in_features == d == l[1].out_features
                and l[0].out_features == l[1].in_features), None)
    if attn is None or mlp is None:
        return None
    return norms[0], norms[1], attn[1], mlp[0], mlp[1]


def vit_block(parts, heads: int, act: str) -> ViTBlock:
    norm1, norm2, (q, k, v, proj, _), fc1, fc2 = parts
    attn = Attention(SeparateQK(q, k, heads), SeparateVO(v, proj, heads), nn.Identity(), nn.Identity())
    mlp = Mlp(fc1.in_features, fc1.out_features, act_layer=ACTS[act])
    mlp.fc1, mlp.fc2 = fc1, fc2
    return ViTBlock(norm1, attn, nn.Identity(), nn.Identity(), norm2, mlp, nn.Identity(), nn.Identity())


def fit_vit_block(blk, x, parts) -> tuple[ViTBlock, dict] | str:
    """The head count and MLP activation that reproduce `blk` on its real input `x`, or why none does."""
    d = parts[0].normalized_shape[0]
    given = parts[2][4]
    heads = [given] if given else [h for h in range(1, d + 1) if d % h == 0]
    best = (float("inf"), None, None)
    try:
        with torch.no_grad():
            ref = blk(x)
    except Exception as e:  # noqa: BLE001 - a block that needs more than its first input: leave it as it is
        return f"it does not run on its first input alone ({type(e).__name__})"
    if not isinstance(ref, torch.Tensor) or ref.shape != x.shape:
        return f"it returns {type(ref).__name__ if not isinstance(ref, torch.Tensor) else 'another shape'}, not a tensor like its input"
    ref = ref - x  # compare what the block adds: the residual would hide small differences
    with torch.no_grad():
        for h in heads:
            for act in ACTS:  # the closest candidate wins: gelu and its tanh form differ only slightly
                new = vit_block(parts, h, act)
                d = rel_diff(ref, new(x) - x)
                if d < best[0]:
                    best = (d, new, {"heads": h, "act": act})
            if best[0] <= 1e-6:  # float round-off only: no other candidate can be closer in any way that matters
                break
    if best[0] <= CONVERT_TOL:
        return best[1], best[2]
    return "its output differs from a pre-norm block (x + attn(norm1 x), then + mlp(norm2 x)) for every head count and activation tried"


# ----------------------------------------------------------------------------- ResNet-like blocks

def res_parts(blk: nn.Module):
    """([(conv, bn)...], shortcut or None) of a ResNet-like block; why not, for a block with 2-3 conv+BN pairs
    and a part that does not fit (a parameter-free shortcut, an SE module, ...); None for anything else."""
    kids = list(blk.named_children())
    pairs, shortcut, odd = [], None, []
    for i, (name, c) in enumerate(kids):
        if isinstance(c, nn.Conv2d):
            nxt = kids[i + 1][1] if i + 1 < len(kids) else None
            if not isinstance(nxt, nn.BatchNorm2d):
                return None
            pairs.append((c, nxt))
        elif isinstance(c, nn.Sequential) and not len(c):
            continue  # an empty Sequential is the identity shortcut
        elif not isinstance(c, (nn.BatchNorm2d, nn.ReLU, nn.Identity)):
            inner = list(c.modules())
            if sum(isinstance(m, nn.Conv2d) for m in inner) == 1 and sum(isinstance(m, nn.BatchNorm2d) for m in inner) == 1:
                shortcut = c
            else:
                odd.append(f"{name} ({type(c).__name__})")
    if len(pairs) not in (2, 3):
        return None
    if odd:
        return (f"part {', '.join(odd)} is neither a conv+BN pair nor a conv+BN shortcut"
                " (a parameter-free shortcut such as zero-padding has no mapped form)")
    return pairs, shortcut


def res_block(parts) -> nn.Module:
    pairs, shortcut = parts
    new = (BasicBlock if len(pairs) == 2 else Bottleneck)(4, 1)  # sizes are placeholders: the layers are yours
    for i, (conv, bn) in enumerate(pairs, 1):
        setattr(new, f"conv{i}", conv)
        setattr(new, f"bn{i}", bn)
    new.downsample = shortcut
    return new.eval()
