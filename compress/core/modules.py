"""Family-neutral ViT building blocks that passes rewrite.

Adapters convert a family's block (timm, HF, ...) into `ViTBlock` once, exactly; passes
then swap the attention's score or value part, or drop the MLP branch. The attribute
names follow timm (norm1, attn, ls1, norm2, mlp, ls2) so untouched weights keep their keys.
"""
from __future__ import annotations

import torch
from torch import nn


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*dh) -> (B, H, N, dh). Every size but the batch is spelled out (no -1): onnxslim then folds the
    exported shape to a constant [-1, N, H, dh]; with -1 on dh the batch stayed a Shape/Gather/Concat chain, 120
    extra nodes on a 6-block ViT, each an onnxruntime kernel launch."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


class SeparateQK(nn.Module):
    """Standard scores: softmax input = (x Wq + bq)(x Wk + bk)^T / sqrt(dh), per head."""

    def __init__(self, q: nn.Linear, k: nn.Linear, heads: int):
        super().__init__()
        self.q, self.k, self.heads = q, k, heads
        self.scale = (q.out_features // heads) ** -0.5

    def forward(self, x):
        q, k = _heads(self.q(x), self.heads), _heads(self.k(x), self.heads)
        return (q * self.scale) @ k.transpose(-2, -1)


class MergedQK(nn.Module):
    """Merged scores: logits_h = (x M_h + u_h) x^T with M_h = Wq_h^T Wk_h / sqrt(dh) (d x d).

    Query-only bias terms are constant along each softmax row and are dropped; the
    key-side term survives as u_h = Wk_h^T bq_h / sqrt(dh) (None without a query bias).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (H, d, d)
        self.bias = nn.Parameter(bias) if bias is not None else None  # (H, 1, d)

    @property
    def heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, x):
        xs = x.unsqueeze(1)  # (B, 1, N, d)
        t = xs @ self.weight
        if self.bias is not None:
            t = t + self.bias
        return t @ xs.transpose(-2, -1)


class SeparateVO(nn.Module):
    """Standard values and output: proj(concat_h A_h (x Wv_h + bv_h))."""

    def __init__(self, v: nn.Linear, proj: nn.Linear, heads: int):
        super().__init__()
        self.v, self.proj, self.heads = v, proj, heads

    def forward(self, attn, x):
        o = attn @ _heads(self.v(x), self.heads)  # (B, H, N, dh)
        b, h, n, dh = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * dh))  # no -1: see _heads


class FoldedVO(nn.Module):
    """Folded values: sum_h A_h x W_h + b with W_h = Wv_h^T Wo_h^T (d x d_out).

    Rows of A_h sum to one, so the value bias folds exactly into b: b = bo + sum_h Wo_h bv_h.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (H, d, d_out)
        self.bias = nn.Parameter(bias) if bias is not None else None

    @property
    def heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, attn, x):
        out = (attn @ (x.unsqueeze(1) @ self.weight)).sum(1)
        return out + self.bias if self.bias is not None else out


class Attention(nn.Module):
    """softmax(score(x) + position bias) feeds value(A, x); any score part combines with any value part.

    `rel_pos` (optional) adds a relative position bias to the logits, as timm's Beit and RelPos attention do:
    called on the logits, it returns them with the bias added. A bias shared by all blocks comes in as `shared`.
    Both are added after q.k, so the score and value parts stay free to be rewritten.
    """

    def __init__(self, score: nn.Module, value: nn.Module, attn_drop: nn.Module, proj_drop: nn.Module,
                 rel_pos: nn.Module | None = None):
        super().__init__()
        self.score, self.value = score, value
        self.attn_drop, self.proj_drop = attn_drop, proj_drop
        self.rel_pos = rel_pos

    def forward(self, x, attn_mask=None, is_causal: bool = False, rope=None, shared=None):
        if is_causal:
            raise NotImplementedError("causal attention is not used by vision models")
        logits = self.score(x) if rope is None else self.score(x, rope)
        if self.rel_pos is not None:
            logits = self.rel_pos(logits)
        if shared is not None:
            logits = logits + shared
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
        attn = self.attn_drop(logits.softmax(dim=-1))
        return self.proj_drop(self.value(attn, x))


class Scale(nn.Module):
    """A layer-scale vector held as a bare parameter by its block (Beit, EVA: `gamma_1 * attn(x)`)."""

    def __init__(self, gamma: nn.Parameter):
        super().__init__()
        self.gamma = gamma

    def forward(self, x):
        return self.gamma * x


class TableBias(nn.Module):
    """Beit's relative position bias: a (distances, heads) table gathered by a fixed (N, N) index, added to the
    logits."""

    def __init__(self, table: nn.Parameter, index: torch.Tensor):
        super().__init__()
        self.relative_position_bias_table = table
        self.register_buffer("relative_position_index", index.clone(), persistent=False)

    def forward(self, logits):
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return logits + bias.permute(2, 0, 1).unsqueeze(0)


class ViTBlock(nn.Module):
    """Pre-norm transformer block; `mlp is None` means the MLP branch was stripped."""

    def __init__(self, norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = norm1, attn, ls1, drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = norm2, mlp, ls2, drop_path2

    def strip_mlp(self) -> None:
        self.norm2 = self.mlp = self.ls2 = self.drop_path2 = None

    def forward(self, x, attn_mask=None, is_causal: bool = False, rope=None, shared_rel_pos_bias=None,
                shared_rel_pos=None):
        """The keyword arguments of every block form mapped here (timm ViT, Beit, RelPos, EVA)."""
        shared = shared_rel_pos_bias if shared_rel_pos_bias is not None else shared_rel_pos
        kw = {k: v for k, v in (("rope", rope), ("shared", shared)) if v is not None}
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, **kw)))
        if self.mlp is not None:
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class SymmetricQK(nn.Module):
    """Symmetric scores: logits_h = (x P_h) diag(s_h) (x P_h)^T + u_h x^T, P_h = V_h |L_h|^(1/2) (d x r).

    One shared projection for queries and keys per head; the sign vector s_h (a buffer) keeps
    negative eigenvalues; u_h is the key-side bias term of the merged form.
    """

    def __init__(self, weight: torch.Tensor, sign: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (H, d, r)
        self.register_buffer("sign", sign)  # (H, 1, r), entries +-1
        self.bias = nn.Parameter(bias) if bias is not None else None  # (H, 1, d)

    @property
    def heads(self) -> int:
        return self.weight.shape[0]

    def forward(self, x):
        xs = x.unsqueeze(1)  # (B, 1, N, d)
        p = xs @ self.weight  # (B, H, N, r)
        logits = (p * self.sign) @ p.transpose(-2, -1)
        if self.bias is not None:
            logits = logits + (xs @ self.bias.transpose(-2, -1)).transpose(-2, -1)  # (B, H, 1, N): per key
        return logits


class RemovedVO(nn.Module):
    """No value or output projection: out = (sum_h alpha_h A_h) x + b, the maps combined first."""

    def __init__(self, alpha: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.alpha = nn.Parameter(alpha)  # (H,)
        self.bias = nn.Parameter(bias) if bias is not None else None  # (d,)

    @property
    def heads(self) -> int:
        return self.alpha.shape[0]

    def forward(self, attn, x):
        a = (attn * self.alpha.view(1, -1, 1, 1)).sum(1)  # (B, N, N): one map, so one product with x
        out = a @ x
        return out + self.bias if self.bias is not None else out


class DiffusedValue(nn.Module):
    """One graph-diffusion step: the value part sees A - gamma*I (gamma learnable, 0 = unchanged)."""

    def __init__(self, value: nn.Module, gamma: float = 0.0):
        super().__init__()
        self.inner = value
        self.gamma = nn.Parameter(torch.tensor([float(gamma)]))

    @property
    def heads(self) -> int:
        return self.inner.heads

    def learned_params(self) -> dict:
        return {"gamma": float(self.gamma.detach())}

    def forward(self, attn, x):
        eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
        return self.inner(attn - self.gamma * eye, x)


class MSSA(nn.Module):
    """CRATE's multi-head subspace self-attention: Q = K = V = x U_h per head, untied output projection."""

    def __init__(self, basis: nn.Linear, proj: nn.Linear, heads: int, attn_drop: nn.Module, proj_drop: nn.Module):
        super().__init__()
        self.basis, self.proj, self.heads = basis, proj, heads  # basis: d -> H*dh, no bias
        self.scale = (basis.out_features // heads) ** -0.5
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        if is_causal:
            raise NotImplementedError("causal attention is not used by vision models")
        p = _heads(self.basis(x), self.heads)  # (B, H, N, dh)
        logits = (p * self.scale) @ p.transpose(-2, -1)
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
        o = self.attn_drop(logits.softmax(dim=-1)) @ p
        b, h, n, dh = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, h * dh)))  # no -1: see _heads


def learned_parameters(model: nn.Module) -> dict[str, dict]:
    """Parameters that passes leave for training to decide (e.g. diffusion gamma), by module name."""
    return {name: m.learned_params() for name, m in model.named_modules() if hasattr(m, "learned_params")}
