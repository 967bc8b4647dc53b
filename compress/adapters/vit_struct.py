"""Transformer blocks of any family mapped to the neutral `ViTBlock` by their structure, then checked numerically.

A block qualifies when it holds norm1, attn, norm2 and mlp (timm's names, which its Beit, RelPos and EVA blocks
share) and its attention holds a head count, a fused `qkv` (with any q/k/v biases held beside it) or separate
q/k/v projections, and a `proj`. A relative position bias (a `rel_pos` child, a bias table) and RoPE (a forward
taking `rope`) are carried over; a q/k norm, a norm before `proj` or a gate stop the mapping, in one line that says
so. The mapping is kept only when the model's outputs stay within 1e-4 of the original's on a random image: a
block whose forward is wired otherwise (post-norm, parallel branches) is left as it was.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..core.errors import InputError
from ..core.modules import Attention, Scale, SeparateQK, SeparateVO, TableBias, ViTBlock, _heads

TOL = 1e-4


class RopeQK(nn.Module):
    """Scores with rotary position embedding (EVA): q and k are rotated per position after their projections, the
    first `prefix` tokens (class, registers) left as they are. qk_merge cannot merge through the rotation."""

    obstacle = "rotates q and k by position (RoPE) before q.k, so W_q^T W_k has no position-free merged form"

    def __init__(self, q: nn.Linear, k: nn.Linear, heads: int, scale: float, prefix: int, half: bool):
        super().__init__()
        self.q, self.k, self.heads, self.scale, self.prefix, self.half = q, k, heads, scale, prefix, half

    def _rotate(self, t, rope):
        from timm.layers import apply_rot_embed_cat  # RoPE is timm's layout: (sin, cos) concatenated

        p = self.prefix
        return torch.cat([t[:, :, :p], apply_rot_embed_cat(t[:, :, p:], rope, half=self.half)], dim=2).type_as(t)

    def forward(self, x, rope=None):  # None: a model built without RoPE whose attention still takes the argument
        q, k = _heads(self.q(x), self.heads), _heads(self.k(x), self.heads)
        if rope is not None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
        return (q * self.scale) @ k.transpose(-2, -1)


def _real(m: nn.Module, child: str) -> bool:
    c = getattr(m, child, None)
    return isinstance(c, nn.Module) and not isinstance(c, nn.Identity)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def _qkv(a: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """q, k, v as three Linears: from a fused `qkv` (plus `q_bias`/`k_bias`/`v_bias` beside it, as Beit and EVA
    keep them) or from separate projections. A bias that is a zero buffer (Beit's k) is left out."""
    qkv = getattr(a, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features % 3 == 0:
        n = qkv.out_features // 3
        out = []
        for j, c in enumerate("qkv"):
            bias = qkv.bias.data[j * n:(j + 1) * n].clone() if qkv.bias is not None else None
            extra = getattr(a, f"{c}_bias", None)
            if isinstance(extra, nn.Parameter) or (isinstance(extra, torch.Tensor) and bool(extra.any())):
                bias = extra.data.clone() if bias is None else bias + extra.data
            out.append(_linear(qkv.weight.data[j * n:(j + 1) * n], bias))
        return tuple(out)
    for names in (("q_proj", "k_proj", "v_proj"), ("q", "k", "v"), ("query", "key", "value")):
        layers = [getattr(a, n, None) for n in names]
        if all(isinstance(m, nn.Linear) for m in layers):
            return tuple(layers)
    return None


def attention_obstacle(a: nn.Module) -> str | None:
    """Why this attention module cannot be mapped to the neutral form (a clause), or None."""
    if _real(a, "q_norm") or _real(a, "k_norm"):
        return "normalises q and k (q/k norm) before q.k, a nonlinear step between the projections and the product"
    if _real(a, "norm"):
        return "normalises the attention output before proj (sub-LN), so the value and output maps are not adjacent"
    if getattr(a, "gate", None) is not None:
        return "gates its output by a sigmoid of the input"
    if not isinstance(getattr(a, "num_heads", None), int) or not isinstance(getattr(a, "proj", None), nn.Linear):
        return "has no head count (num_heads) and output projection (proj) where a timm-style attention keeps them"
    if _qkv(a) is None:
        return "has neither a fused qkv Linear nor separate q/k/v Linears"
    return None


def _takes(m: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(m.forward).parameters
    except (TypeError, ValueError):
        return False


def convert_attention(a: nn.Module) -> Attention:
    q, k, v = _qkv(a)
    h = a.num_heads
    scale = float(a.scale) if isinstance(getattr(a, "scale", None), float) else (q.out_features // h) ** -0.5
    if _takes(a, "rope"):
        score = RopeQK(q, k, h, scale, int(getattr(a, "num_prefix_tokens", 0) or 0), bool(getattr(a, "rotate_half", False)))
    else:
        score = SeparateQK(q, k, h)
        score.scale = scale
    rel_pos = getattr(a, "rel_pos", None)
    table = getattr(a, "relative_position_bias_table", None)
    if isinstance(table, nn.Parameter):
        rel_pos = TableBias(table, a.relative_position_index)
    drop = [getattr(a, n, None) if isinstance(getattr(a, n, None), nn.Module) else nn.Identity()
            for n in ("attn_drop", "proj_drop")]
    return Attention(score, SeparateVO(v, a.proj, h), *drop, rel_pos=rel_pos if isinstance(rel_pos, nn.Module) else None)


def _scale(blk: nn.Module, i: int) -> nn.Module:
    ls = getattr(blk, f"ls{i}", None)
    if isinstance(ls, nn.Module):
        return ls
    gamma = getattr(blk, f"gamma_{i}", None)
    return Scale(gamma) if isinstance(gamma, nn.Parameter) else nn.Identity()


def _drop(blk: nn.Module, i: int) -> nn.Module:
    for n in (f"drop_path{i}", "drop_path"):
        if isinstance(getattr(blk, n, None), nn.Module):
            return getattr(blk, n)
    return nn.Identity()


def block_obstacle(blk: nn.Module) -> str | None:
    if isinstance(blk, ViTBlock):
        return None
    missing = [n for n in ("norm1", "attn", "norm2", "mlp") if not isinstance(getattr(blk, n, None), nn.Module)]
    if missing:
        return f"has no {', '.join(missing)} (a pre-norm block keeps norm1, attn, norm2, mlp)"
    why = attention_obstacle(blk.attn)
    return f"its attention ({type(blk.attn).__name__}) {why}" if why else None


def convert_block(blk: nn.Module) -> ViTBlock:
    return ViTBlock(blk.norm1, convert_attention(blk.attn), _scale(blk, 1), _drop(blk, 1), blk.norm2, blk.mlp,
                    _scale(blk, 2), _drop(blk, 2))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        out = list(out.values())
    return next(t for t in out if isinstance(t, torch.Tensor))


def map_blocks(model: nn.Module, lists: list[tuple[str, nn.Module]], size: tuple[int, ...]) -> list[ViTBlock]:
    """Convert the longest list of transformer blocks in place and return it; InputError (one clause on why) when
    no list maps exactly. `lists`: the model's repeated-block containers, `size`: its input (C, H, W)."""
    if not lists:
        raise InputError("no repeated blocks found")
    name, blocks = max(lists, key=lambda x: len(x[1]))
    if all(isinstance(b, ViTBlock) for b in blocks):
        return list(blocks)
    for i, b in enumerate(blocks):
        why = block_obstacle(b)
        if why:
            raise InputError(f"{name}.{i} ({type(b).__name__}) {why}")
    p = next(model.parameters())
    x = torch.randn((2, *size), generator=torch.Generator().manual_seed(0)).to(p.dtype)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = _first_tensor(model(x))
            old = list(blocks)
            try:
                for i, b in enumerate(old):
                    blocks[i] = convert_block(b)
                err = float((_first_tensor(model(x)) - ref).abs().max())
            except Exception as e:  # noqa: BLE001 - a forward that does not take the mapped block: not mapped
                err, failed = float("inf"), f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                failed = None
        if not err <= TOL * max(1.0, float(ref.abs().max())):
            for i, b in enumerate(old):
                blocks[i] = b
            raise InputError(f"{name}.0 ({type(old[0]).__name__}) does not compute x + attn(norm1(x)) then "
                             f"x + mlp(norm2(x)) as mapped ({failed or f'outputs moved by {err:.2g}'}): its forward is wired otherwise")
    finally:
        model.train(was)
    return list(blocks)


def geometry(model: nn.Module, blocks: list[ViTBlock], size: tuple[int, ...]) -> dict:
    """Tokens, width and heads of mapped blocks, the tokens read from the first block's input on one image."""
    seen = {}

    def note(_, args):  # returns None: a pre-hook's return value would replace the block's input
        seen.setdefault("shape", args[0].shape)

    hook = blocks[0].register_forward_pre_hook(note)
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *size), dtype=p.dtype))
    finally:
        hook.remove()
    part = blocks[0].attn.score
    return {"tokens": int(seen["shape"][1]), "width": int(seen["shape"][2]), "heads": int(part.heads)}
