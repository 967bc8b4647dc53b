"""Where a `width` cut can go, per family: a producer whose outputs are narrowed, and the consumer refit.

A `Group` is one width inside a block: a ViT MLP's hidden units (fc1 -> fc2), a block's per-head Q/K
dimension (q, k -> the softmax), its per-head V dimension (v -> proj), a residual block's inner
channels (conv1 -> conv2, conv2 -> conv3). Blocks are walked in order; each cut sees the current
block input `h` and, for its least-squares targets, the unmodified block on the teacher's input.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..modules import SeparateQK, SeparateVO
from ..probe import capture
from . import _width_fit as fit


@dataclass
class Group:
    name: str  # e.g. "blocks.3.mlp", "layer2.0.conv1"
    kind: str  # mlp | qk | vo | conv
    block: int  # index in the chain of blocks
    full: int  # current width (hidden units, per-head dim, channels)
    heads: int  # qk/vo: the width repeats per head
    flops: float  # multiply-accumulates per image per unit of width
    params: float  # parameters per unit of width
    pair: tuple[str, float, float] | None = None  # (group, flops, params) per unit x unit: a 3x3 conv between two widths


# ------------------------------------------------------------------ helpers
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, N, f) tokens or (B, C, H, W) maps -> (rows, features), channels last."""
    return t.reshape(-1, t.shape[-1]) if t.dim() == 3 else t.movedim(1, -1).reshape(-1, t.shape[1])


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The consumer conv's input as im2col rows (rows, C*k*k), channel-major as the weight flattens."""
    cols = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _upper(x: torch.Tensor) -> torch.Tensor:
    """Upper R with R^T R = x^T x (a tiny jitter keeps a dead direction from breaking it)."""
    g = x.T @ x
    g.diagonal().add_(1e-10 * float(g.diagonal().mean().clamp_min(1e-30)) + 1e-300)
    return torch.linalg.cholesky(g).T


def _fold_rows(lin: nn.Linear, heads: int, t: list[torch.Tensor]) -> nn.Linear:
    """Head h's outputs become the old ones times t[h] (dh x r): W_h' = t_h^T W_h, b_h' = t_h^T b_h."""
    d_h = lin.out_features // heads
    new = nn.Linear(lin.in_features, heads * t[0].shape[1], bias=lin.bias is not None).to(lin.weight.dtype)
    w = lin.weight.detach().double().view(heads, d_h, -1)
    new.weight.data.copy_(torch.cat([t[h].T @ w[h] for h in range(heads)]))
    if lin.bias is not None:
        b = lin.bias.detach().double().view(heads, d_h)
        new.bias.data.copy_(torch.cat([t[h].T @ b[h] for h in range(heads)]))
    return new


def _narrow_out(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A Linear/Conv2d/BatchNorm with only the `keep` output channels (the same module type, sliced)."""
    new = copy.deepcopy(m)
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, name, None)
        if t is not None:
            sliced = t.detach()[keep].clone()
            setattr(new, name, nn.Parameter(sliced) if isinstance(t, nn.Parameter) else sliced)
    for attr in ("out_features", "out_channels", "num_features"):
        if hasattr(new, attr):
            setattr(new, attr, len(keep))
    return new


def _consumer(m: nn.Module, w: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """`m` with new input width: w is (out, in) for a Linear, (out, in*k*k) for a conv."""
    new = copy.deepcopy(m)
    if isinstance(m, nn.Linear):
        new.in_features = w.shape[1]
        shape = w.shape
    else:
        new.in_channels = w.shape[1] // (m.kernel_size[0] * m.kernel_size[1])
        shape = (w.shape[0], new.in_channels, *m.kernel_size)
    new.weight = nn.Parameter(w.reshape(shape).to(m.weight.dtype).contiguous())
    if bias is not None and m.bias is not None:
        new.bias = nn.Parameter(bias.to(m.weight.dtype))
    return new


# ------------------------------------------------------------------ cuts
class Cut:
    """What one group needs: its survey (error curve over widths) and the cut to a width."""

    def __init__(self, group: Group, multiple: int, ridge: float, refit: bool):
        self.g, self.multiple, self.ridge, self.refit = group, multiple, ridge, refit

    def widths(self) -> list[int]:
        m, q = self.g.full, self.multiple
        return sorted({*range(q, m, q), m})


class SelectCut(Cut):
    """Keep k of the producer's output units (ViT MLP hidden units, inner conv channels); refit the consumer.

    `producer`, `norm` (optional, sliced with it) and `consumer` are attribute paths in the block;
    `after` is the norm that follows a bias-free consumer and absorbs its fitted constant.
    """

    def __init__(self, group, multiple, ridge, refit, producer: str, consumer: str, norm: str | None = None,
                 after: str | None = None):
        super().__init__(group, multiple, ridge, refit)
        self.producer, self.consumer, self.norm, self.after = producer, consumer, norm, after

    def _problem(self, blk, ref_blk, h, h_ref) -> fit.Problem:
        cons, ref_cons = blk.get_submodule(self.consumer), ref_blk.get_submodule(self.consumer)
        x = capture(blk, [cons], h, inputs=True)[0]
        y = capture(ref_blk, [ref_cons], h_ref)[0]
        if isinstance(cons, nn.Conv2d):
            return fit.problem(_patches(cons, x), _rows(y), cons.kernel_size[0] * cons.kernel_size[1])
        return fit.problem(_rows(x), _rows(y))

    def survey(self, blk, h) -> dict[int, float]:
        _, curve = fit.removal_order(self._problem(blk, blk, h, h), min(self.widths()), self.multiple, self.ridge)
        return fit.interpolate({self.g.full: 0.0, **curve}, self.widths())

    def cut(self, blk, ref_blk, h, h_ref, k: int, dirty: bool) -> float:
        p = self._problem(blk, ref_blk, h, h_ref)
        order, curve = fit.removal_order(p, k, self.multiple, self.ridge)
        keep = torch.tensor(sorted(set(range(p.units)) - set(order)))
        cons = blk.get_submodule(self.consumer)
        fitted_bias = cons.bias is not None or self.after is not None
        sliced = cons.weight.detach().double().flatten(1)[:, fit.columns(keep, p.group)]
        w, b = sliced, None  # without a refit: the same selection, the consumer only sliced
        if self.refit and (k < self.g.full or dirty):
            w = fit.refit(p, keep.tolist(), self.ridge, sliced, bias=fitted_bias)
            w, b = (w[:, :-1], w[:, -1]) if fitted_bias else (w, None)
        if b is not None and cons.bias is None:  # a bias-free conv: its BatchNorm takes the constant
            bn = blk.get_submodule(self.after)
            bn.running_mean.sub_(b.to(bn.running_mean.dtype))
            b = None
        _set(blk, self.consumer, _consumer(cons, w, b))
        _set(blk, self.producer, _narrow_out(blk.get_submodule(self.producer), keep))
        if self.norm:
            _set(blk, self.norm, _narrow_out(blk.get_submodule(self.norm), keep))
        return curve.get(k, 0.0)

    def replay(self, blk, k: int) -> None:
        keep = torch.arange(k)
        cons = blk.get_submodule(self.consumer)
        cols = fit.columns(keep, cons.weight[0].numel() // (cons.weight.shape[1]))
        _set(blk, self.consumer, _consumer(cons, cons.weight.detach().flatten(1)[:, cols], None))
        _set(blk, self.producer, _narrow_out(blk.get_submodule(self.producer), keep))
        if self.norm:
            _set(blk, self.norm, _narrow_out(blk.get_submodule(self.norm), keep))


class QKCut(Cut):
    """Per head, the rank-r form of Q K^T nearest on calibration tokens (whitened SVD), folded into narrower q, k.

    logits = s Q K^T ~ s' (Q A)(K B)^T with A B^T the best rank r: an exact rotation at r = dh.
    """

    def _spectra(self, s: SeparateQK, a: torch.Tensor):
        q, k = (_rows(m(a)).double().view(-1, s.heads, m.out_features // s.heads) for m in (s.q, s.k))
        for i in range(s.heads):
            rq, rk = _upper(q[:, i]), _upper(k[:, i])
            u, sv, vt = torch.linalg.svd(rq @ rk.T)
            yield rq, rk, u, sv, vt

    def survey(self, blk, h) -> dict[int, float]:
        sv = [e[3] ** 2 for e in self._spectra(blk.attn.score, blk.norm1(h))]
        tot = sum(float(s.sum()) for s in sv)
        return {r: sum(float(s[r:].sum()) for s in sv) / max(tot, 1e-30) for r in self.widths()}

    def cut(self, blk, ref_blk, h, h_ref, r: int, dirty: bool) -> float:
        s = blk.attn.score
        dh = s.q.out_features // s.heads
        tq, tk, lost, tot = [], [], 0.0, 0.0
        for rq, rk, u, sv, vt in self._spectra(s, blk.norm1(h)):
            lost, tot = lost + float((sv[r:] ** 2).sum()), tot + float((sv ** 2).sum())
            root = sv[:r].sqrt()
            tq.append(torch.linalg.solve_triangular(rq, u[:, :r] * root * (r / dh) ** 0.5, upper=True))
            tk.append(torch.linalg.solve_triangular(rk, vt[:r].T * root, upper=True))
        blk.attn.score = SeparateQK(_fold_rows(s.q, s.heads, tq), _fold_rows(s.k, s.heads, tk), s.heads)
        return lost / max(tot, 1e-30)

    def replay(self, blk, r: int) -> None:
        s = blk.attn.score
        eye = [torch.eye(s.q.out_features // s.heads, r, dtype=torch.float64)] * s.heads
        blk.attn.score = SeparateQK(_fold_rows(s.q, s.heads, eye), _fold_rows(s.k, s.heads, eye), s.heads)


class VOCut(Cut):
    """Per head, V onto the r-dim subspace that best keeps that head's output Z_h P_h^T; then refit proj."""

    def _z(self, blk, h) -> torch.Tensor:
        return _rows(capture(blk, [blk.attn.value.proj], h, inputs=True)[0]).double()

    def _heads(self, v: SeparateVO, z: torch.Tensor):
        dh = v.proj.in_features // v.heads
        pw = v.proj.weight.detach().double()
        for i in range(v.heads):
            rz = _upper(z[:, i * dh:(i + 1) * dh])
            u, sv, _ = torch.linalg.svd(rz @ pw[:, i * dh:(i + 1) * dh].T, full_matrices=False)
            yield rz, u, sv, pw[:, i * dh:(i + 1) * dh]

    def survey(self, blk, h) -> dict[int, float]:
        sv = [e[2] ** 2 for e in self._heads(blk.attn.value, self._z(blk, h))]
        tot = sum(float(s.sum()) for s in sv)
        return {r: sum(float(s[r:].sum()) for s in sv) / max(tot, 1e-30) for r in self.widths()}

    def cut(self, blk, ref_blk, h, h_ref, r: int, dirty: bool) -> float:
        v = blk.attn.value
        z = self._z(blk, h)
        dh = v.proj.in_features // v.heads
        ts, maps, lost, tot = [], [], 0.0, 0.0
        for rz, u, sv, p_h in self._heads(v, z):
            lost, tot = lost + float((sv[r:] ** 2).sum()), tot + float((sv ** 2).sum())
            ts.append(torch.linalg.solve_triangular(rz, u[:, :r], upper=True))  # Z_h t_h: whitened, top r
            maps.append(p_h @ rz.T @ u[:, :r])  # P_h' = P_h R^T U_r: the projection alone
        bias = v.proj.bias.detach().double() if v.proj.bias is not None else None
        w = torch.cat(maps, 1)
        if self.refit and (r < dh or dirty):
            zt = torch.cat([z[:, i * dh:(i + 1) * dh] @ ts[i] for i in range(v.heads)], 1)
            y = _rows(capture(ref_blk, [ref_blk.attn.value.proj], h_ref)[0])
            fitted = fit.refit(fit.problem(zt, y), list(range(zt.shape[1])), self.ridge, w, bias=bias is not None)
            w, bias = (fitted[:, :-1], fitted[:, -1]) if bias is not None else (fitted, None)
        blk.attn.value = SeparateVO(_fold_rows(v.v, v.heads, ts), _consumer(v.proj, w, bias), v.heads)
        return lost / max(tot, 1e-30)

    def replay(self, blk, r: int) -> None:
        v = blk.attn.value
        dh = v.proj.in_features // v.heads
        eye = [torch.eye(dh, r, dtype=torch.float64)] * v.heads
        cols = torch.cat([torch.arange(r) + i * dh for i in range(v.heads)])
        blk.attn.value = SeparateVO(_fold_rows(v.v, v.heads, eye),
                                    _consumer(v.proj, v.proj.weight.detach()[:, cols], None), v.heads)


def _set(blk: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(blk.get_submodule(parent) if parent else blk, attr, new)
