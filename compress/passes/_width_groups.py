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

from ..core.modules import SeparateQK, SeparateVO
from ..core.probe import capture
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


@dataclass
class Link:
    """A layer between two widths (a 3x3 conv between inner widths, a 1x1 conv reading a residual stream): its cost
    is flops (params) per unit of `a` x unit of `b`."""
    a: str
    b: str
    flops: float
    params: float


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


def _problem(blk, ref_blk, h, h_ref, consumer: str, rows=None) -> fit.Problem:
    """The consumer's input in `blk` on h against the reference block's consumer output on h_ref (`rows` of it)."""
    cons, ref_cons = blk.get_submodule(consumer), ref_blk.get_submodule(consumer)
    x = capture(blk, [cons], h, inputs=True)[0]
    y = capture(ref_blk, [ref_cons], h_ref)[0]
    if rows is not None:
        y = y[:, rows]
    if isinstance(cons, nn.Conv2d):
        return fit.problem(_patches(cons, x), _rows(y), cons.kernel_size[0] * cons.kernel_size[1])
    return fit.problem(_rows(x), _rows(y))


def _narrow_in(m: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A Linear/Conv2d reading only the `keep` input channels."""
    new = copy.deepcopy(m)
    new.weight = nn.Parameter(m.weight.detach()[:, keep].clone())
    if isinstance(m, nn.Linear):
        new.in_features = len(keep)
    else:
        new.in_channels = len(keep)
    return new


def _refit(root: nn.Module, path: str, p: fit.Problem, keep: list[int], ridge: float, prior: torch.Tensor,
           after: str | None = None) -> None:
    """Replace the Linear/conv at `path` by its least-squares refit on `p` from the `keep` input units; a bias-free
    conv's fitted constant goes into the running mean of the BatchNorm `after` it."""
    cons = root.get_submodule(path)
    with_bias = cons.bias is not None or after is not None
    w = fit.refit(p, keep, ridge, prior, bias=with_bias)
    w, b = (w[:, :-1], w[:, -1]) if with_bias else (w, None)
    if b is not None and cons.bias is None:
        norm = root.get_submodule(after)
        norm.running_mean.sub_(b.to(norm.running_mean.dtype))
        b = None
    _set(root, path, _consumer(cons, w, b))


def refit_reader(blk, ref_blk, h, h_ref, conv: str, bn: str | None, ridge: float, rows=None) -> None:
    """Refit a conv whose input channels were narrowed to the reference outputs (`rows` of them)."""
    p = _problem(blk, ref_blk, h, h_ref, conv, rows)
    _refit(blk, conv, p, list(range(p.units)), ridge, blk.get_submodule(conv).weight.detach().double().flatten(1), bn)


# ------------------------------------------------------------------ cuts
class Cut:
    """What one group needs: its survey (error curve over widths) and the cut to a width."""

    def __init__(self, group: Group, multiple: int, ridge: float, refit: bool):
        self.g, self.multiple, self.ridge, self.refit = group, multiple, ridge, refit

    def widths(self) -> list[int]:
        m, q = self.g.full, self.multiple
        return sorted({*range(q, m, q), m})

    def survey_in(self, model, blocks, calib, blk, h) -> dict[int, float]:
        return self.survey(blk, h)

    def replay_in(self, model, blocks, k: int) -> None:
        self.replay(blocks[self.g.block], k)


class SelectCut(Cut):
    """Keep k of the producer's output units (ViT MLP hidden units, inner conv channels); refit the consumer.

    `producer`, `norm` (optional, sliced with it) and `consumer` are attribute paths in the block;
    `after` is the norm that follows a bias-free consumer and absorbs its fitted constant.
    """

    def __init__(self, group, multiple, ridge, refit, producer: str, consumer: str, norm: str | None = None,
                 after: str | None = None):
        super().__init__(group, multiple, ridge, refit)
        self.producer, self.consumer, self.norm, self.after = producer, consumer, norm, after

    def _problem(self, blk, ref_blk, h, h_ref, rows=None) -> fit.Problem:
        return _problem(blk, ref_blk, h, h_ref, self.consumer, rows)

    def survey(self, blk, h) -> dict[int, float]:
        _, curve = fit.removal_order(self._problem(blk, blk, h, h), min(self.widths()), self.multiple, self.ridge)
        return fit.interpolate({self.g.full: 0.0, **curve}, self.widths())

    def cut(self, blk, ref_blk, h, h_ref, k: int, dirty: bool, rows=None) -> float:
        """`rows`: the consumer's outputs that are kept (its output is a residual stream that was narrowed)."""
        p = self._problem(blk, ref_blk, h, h_ref, rows)
        order, curve = fit.removal_order(p, k, self.multiple, self.ridge)
        keep = torch.tensor(sorted(set(range(p.units)) - set(order)))
        cons = blk.get_submodule(self.consumer)
        sliced = cons.weight.detach().double().flatten(1)[:, fit.columns(keep, p.group)]
        if self.refit and (k < self.g.full or dirty):
            _refit(blk, self.consumer, p, keep.tolist(), self.ridge, sliced, self.after)
        else:  # without a refit: the same selection, the consumer only sliced
            _set(blk, self.consumer, _consumer(cons, sliced, None))
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


@dataclass
class Stream:
    """A stage's residual width: the blocks (indices in the chain) that share it, the first with the downsample.

    Written by each member's last conv/BN (`out`) and the first member's downsample conv/BN (`shortcut`); read
    by the later members' conv1, then by the next stage's first block (conv1 and downsample) or the classifier.
    """
    members: list[int]
    out: tuple[str, str]  # ("conv3", "bn3") or ("conv2", "bn2")
    shortcut: tuple[str, str]  # e.g. ("downsample.0", "downsample.1")
    nxt: int | None  # the next stage's first block, or None: the classifier reads the pooled stream
    nxt_shortcut: tuple[str, str] | None
    head: str | None  # the classifier Linear's path from the model root


class StreamCut(Cut):
    """Keep k of a stage's residual channels, in every layer that writes or reads them (stage-consistent).

    Channels are kept by their readers' weight energy (after BatchNorm scaling) times the calibration energy of
    the stream: the output each reader loses. Readers are refit by least squares during the block walk, writers
    fit the kept channels of the teacher's outputs, the classifier is refit on the pooled features.
    """

    def __init__(self, group, multiple, ridge, refit, stream: Stream):
        super().__init__(group, multiple, ridge, refit)
        self.s = stream

    def readers(self) -> list[tuple[int, str, str | None]]:
        """(block, conv, bn) reading the stream."""
        s = self.s
        out = [(i, "conv1", "bn1") for i in s.members[1:]]
        if s.nxt is not None:
            out += [(s.nxt, "conv1", "bn1"), (s.nxt, *s.nxt_shortcut)]
        return out

    def writers(self) -> list[tuple[int, str, str]]:
        return [(self.s.members[0], *self.s.shortcut)] + [(i, *self.s.out) for i in self.s.members]

    def scores(self, model, blocks, calib) -> torch.Tensor:
        readers = self.readers()
        mods = [blocks[i].get_submodule(c) for i, c, _ in readers]
        if self.s.head is not None:
            mods.append(model.get_submodule(self.s.head))
        energy = [(_rows(x).double() ** 2).mean(0) for x in capture(model, mods, calib, inputs=True)]
        score = torch.zeros(self.g.full, dtype=torch.float64)
        bns = [blocks[i].get_submodule(b) if b else None for i, _, b in readers] + [None]
        for m, bn, e in zip(mods, bns, energy):
            w = m.weight.detach().double().flatten(2) if m.weight.dim() == 4 else m.weight.detach().double()[:, :, None]
            if bn is not None:  # the reader's outputs as its BatchNorm scales them
                w = w * (bn.weight.detach().double() / (bn.running_var.double() + bn.eps).sqrt())[:, None, None]
            score += e * (w ** 2).sum((0, 2))
        return score

    def choose(self, model, blocks, calib, k: int) -> tuple[torch.Tensor, float]:
        score = self.scores(model, blocks, calib)
        order = torch.argsort(score, descending=True)
        return order[:k].sort().values, float(score[order[k:]].sum() / score.sum().clamp_min(1e-300))

    def survey_in(self, model, blocks, calib, blk, h) -> dict[int, float]:
        score = self.scores(model, blocks, calib).sort().values  # ascending: the cheapest dropped first
        lost = torch.cumsum(score, 0) / score.sum().clamp_min(1e-300)
        return {w: float(lost[self.g.full - w - 1]) if w < self.g.full else 0.0 for w in self.widths()}

    def narrow(self, model, blocks, keep: torch.Tensor) -> None:
        for i, conv, bn in self.writers():
            _set(blocks[i], conv, _narrow_out(blocks[i].get_submodule(conv), keep))
            _set(blocks[i], bn, _narrow_out(blocks[i].get_submodule(bn), keep))
        for i, conv, _ in self.readers():
            _set(blocks[i], conv, _narrow_in(blocks[i].get_submodule(conv), keep))
        if self.s.head is not None:
            _set(model, self.s.head, _narrow_in(model.get_submodule(self.s.head), keep))
            for attr in ("num_features", "head_hidden_size"):  # timm's record of the classifier's input width
                if isinstance(getattr(model, attr, None), int):
                    setattr(model, attr, len(keep))

    def refit_head(self, model, calib, ref_logits: torch.Tensor) -> None:
        head = model.get_submodule(self.s.head)
        x = capture(model, [head], calib, inputs=True)[0]
        p = fit.problem(x, ref_logits)
        _refit(model, self.s.head, p, list(range(p.units)), self.ridge, head.weight.detach().double())

    def replay_in(self, model, blocks, k: int) -> None:
        self.narrow(model, blocks, torch.arange(k))


def _set(blk: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(blk.get_submodule(parent) if parent else blk, attr, new)
