"""Token merging (ToMe, Bolya et al. ICLR 2023): bipartite soft matching with static shapes.

The tokens after a protected prefix (class, distillation, register tokens: never merged) are split alternately into
sets A (even positions) and B (odd). Each A token finds its most similar B token (cosine of the head-averaged keys);
the r A tokens with the best matches are averaged into their B partners, weighted by how many original tokens each
already stands for (`size`). Every shape depends on r alone, never on the data, so the ONNX graph is static.

Exported ops: MatMul, ReduceMax/ArgMax, TopK, GatherElements, Equal/Cast and Concat. ToMe's gathers and
scatter-add (`scatter_reduce`, ONNX ScatterElements with a reduction: opset 16+) are one 0/1 matrix product here,
which every opset and onnxruntime release runs (merge_matrix).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .modules import SeparateQK, ViTBlock, _heads


def _normalise(metric: torch.Tensor) -> torch.Tensor:
    """Unit rows in float32, whatever the model's dtype: an fp16 similarity would reorder near-ties. (No clamp: a
    key of norm 0 does not occur in a trained model, and every node costs time in a small graph.)"""
    m = metric.float()
    return m / m.norm(dim=-1, keepdim=True)


def _edges(metric: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(edge_idx, node_idx): the A tokens ordered by their best match, best first (B, na), and each A token's best
    B partner (B, na). metric: (B, N, c) per-token features (keys averaged over heads)."""
    m = _normalise(metric)
    a, b = m[:, prefix::2], m[:, prefix + 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)  # (B, na) over the (B, na, nb) similarities
    return torch.topk(node_max, a.shape[1], dim=-1).indices, node_idx  # TopK exports everywhere


def bipartite_match(metric: torch.Tensor, r: int, prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which tokens merge: (unm_idx, src_idx, dst_idx), indices into A of the A tokens kept (B, na - r) and merged
    (B, r), and the index into B of each merged token's partner (B, r). A and B count tokens after the prefix only:
    A token i sits at prefix + 2i, B token j at prefix + 2j + 1."""
    edge_idx, node_idx = _edges(metric, prefix)
    src_idx = edge_idx[:, :r]
    return edge_idx[:, r:], src_idx, node_idx.gather(dim=-1, index=src_idx)


def _rows(pos: torch.Tensor, n: int) -> torch.Tensor:
    """One-hot rows (B, k, n) in float32 of token positions (B, k)."""
    return (pos.unsqueeze(-1) == torch.arange(n, device=pos.device)).float()


def _matrix(edge_idx: torch.Tensor, dst_idx: torch.Tensor, r: int, n: int, prefix: int) -> torch.Tensor:
    rows = _rows(prefix + 2 * edge_idx, n)  # (B, na, n): the A tokens, best match first
    src, keep = rows[:, :r], rows[:, r:]
    nb = (n - prefix) // 2
    eye_b = _rows(prefix + 1 + 2 * torch.arange(nb, device=rows.device), n)  # (nb, n): each B token itself
    dst = eye_b + _rows(dst_idx, nb).transpose(1, 2) @ src  # (B, nb, n): B tokens with their partners
    if not prefix:
        return torch.cat([keep, dst], dim=1)
    first = src[:, :1] * 0 + torch.eye(prefix, n, device=rows.device)  # (B, prefix, n); r >= 1
    return torch.cat([first, keep, dst], dim=1)


def merge_matrix(idx: tuple, n: int, prefix: int) -> torch.Tensor:
    """The merge as a (B, n - r, n) 0/1 matrix in float32: row i sums the tokens that output token i stands for
    (the prefix first, then the kept A tokens, then B with its partners). One MatMul applies it: no Expand chains
    for the batch, no scatter (ScatterElements' reduction needs opset 16), every onnxruntime runs it."""
    unm_idx, src_idx, dst_idx = idx
    return _matrix(torch.cat([src_idx, unm_idx], dim=1), dst_idx, src_idx.shape[1], n, prefix)


class TokenMatch(nn.Module):
    """bipartite_match and merge_matrix as a module, so the exported nodes carry its name ("/match/"): the fp16
    variant keeps them in float32 (export/write.py), since an fp16 similarity would reorder near-ties."""

    def __init__(self, r: int, prefix: int):
        super().__init__()
        self.r, self.prefix = r, prefix
        self.tokens: int | None = None  # at this block's input, set by the pass: the export's sizes as constants

    def forward(self, metric):
        # traced, metric.shape[1] would be a Shape/Gather chain and arange a Range node in the file
        n = self.tokens if self.tokens is not None and torch.jit.is_tracing() else metric.shape[1]
        edge_idx, node_idx = _edges(metric, self.prefix)
        dst_idx = node_idx.gather(dim=-1, index=edge_idx[:, :self.r])
        return _matrix(edge_idx, dst_idx, self.r, n, self.prefix)


def merge_wavg(x: torch.Tensor, size: torch.Tensor | None, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens of x (B, N, C) by size-weighted average as the merge matrix m says; returns (x, size) with
    N - r tokens. size: (B, N, 1) tokens each row stands for, None = all ones."""
    m = m.to(x.dtype)
    if size is None:
        size = m.sum(dim=-1, keepdim=True)
        return (m @ x) / size, size
    new = m @ size
    return (m @ (x * size)) / new, new


def best_match_cosine(metric: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B,) mean over A tokens of the cosine to their best B partner: near 1 where merging costs little."""
    rest = _normalise(metric[:, prefix:])
    return (rest[:, ::2] @ rest[:, 1::2].transpose(-1, -2)).max(dim=-1).values.mean(dim=-1)


def max_r(tokens: int, prefix: int) -> int:
    """The most tokens one block merges (ToMe's bound): half of those after the prefix."""
    return max(0, (tokens - prefix) // 2)


class MergingBlock(ViTBlock):
    """A ViTBlock that merges `r` tokens between its attention and its MLP, and whose attention is proportional:
    log(size) added to the logits of each key, so a merged token weighs as the tokens it stands for.

    The sizes travel from block to block in `state`, a plain dict shared by all blocks of the model (not a module:
    nothing in the state dict); the first block starts it, the last clears it. With r = 0 in every block no size
    exists and the block computes exactly what ViTBlock does. The weights keep ViTBlock's names."""

    def __init__(self, blk: ViTBlock, r: int, prefix: int, state: dict, first: bool, last: bool):
        super().__init__(blk.norm1, blk.attn, blk.ls1, blk.drop_path1, blk.norm2, blk.mlp, blk.ls2, blk.drop_path2)
        self.prefix, self.first, self.last = int(prefix), first, last
        self.match = TokenMatch(int(r), int(prefix))
        self.__dict__["_state"] = state

    @property
    def r(self) -> int:
        return self.match.r

    @r.setter
    def r(self, value: int) -> None:
        self.match.r = int(value)

    def forward(self, x, attn_mask=None, is_causal: bool = False, rope=None, shared_rel_pos_bias=None,
                shared_rel_pos=None):
        if is_causal or rope is not None or shared_rel_pos_bias is not None or shared_rel_pos is not None:
            raise NotImplementedError("a RoPE or a position bias shared by all blocks, of fixed size N x N")
        state = self._state
        if self.first:
            state["size"] = None
        size = state.get("size")
        a, h = self.attn, self.norm1(x)
        fused = hasattr(a, "qkv_heads")  # export/fuse.py's one-MatMul form, swapped in for the export only
        if fused:
            q, k, v = a.qkv_heads(h)
            scale = a.scale
        else:
            q, k = _heads(a.score.q(h), a.score.heads), _heads(a.score.k(h), a.score.heads)
            scale = a.score.scale
        logits = (q * scale) @ k.transpose(-2, -1)
        if size is not None:
            logits = logits + size.log().transpose(1, 2).unsqueeze(1)  # (B, 1, 1, N): per key
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
        attn = logits.softmax(dim=-1)
        out = a.output(attn, v) if fused else a.proj_drop(a.value(a.attn_drop(attn), h))
        x = x + self.drop_path1(self.ls1(out))
        if self.r > 0:
            x, size = merge_wavg(x, size, self.match(k.mean(dim=1)))
        state["size"] = None if self.last else size
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def mergeable(blk: nn.Module) -> str | None:
    """Why a block cannot merge tokens (a clause), or None."""
    if not isinstance(blk, ViTBlock):
        return f"is a {type(blk).__name__}, not a transformer block the adapters map"
    score = getattr(blk.attn, "score", None)
    if hasattr(score, "rope") or type(score).__name__ == "RopeQK":
        return "rotates q and k by position (RoPE), and merged tokens have no single position"
    if type(score) is not SeparateQK:
        return (f"computes its attention scores with {type(score).__name__} (no separate keys to match tokens on: "
                "put token_merge before qk_merge)")
    if getattr(blk.attn, "rel_pos", None) is not None:
        return "adds a relative position bias of fixed size N x N, which merged tokens no longer have"
    return None


def prefix_tokens(model: nn.Module, tokens: int) -> int:
    """Class, distillation and register tokens: timm's `num_prefix_tokens`, else what is left of the token count
    above a square patch grid."""
    n = getattr(model, "num_prefix_tokens", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    return tokens - math.isqrt(tokens) ** 2
