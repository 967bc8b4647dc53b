"""tie_rowcol for ResNet blocks: the last conv becomes the transpose of the first, BatchNorm absorbs the rescaling.

Bottleneck: conv3 (1x1, C x m) := conv1^T (1x1, m x C); BasicBlock: conv2 := ConvTranspose with
conv1's 3x3 weight. Eval-mode BN absorbs any nonzero per-channel scale of its conv's output
exactly, so we fit diag(r) W1 ~ W ~ T^-1(W3) diag(c), average, and refold each BN by the
least-squares scale of the old conv output on the new one.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError
from ..core.registry import PassResult
from ._blocks import select
from .tied import TiedConv


def _pair(blk) -> tuple[str, str, str, str]:
    return ("conv1", "conv3", "bn1", "bn3") if getattr(blk, "conv3", None) is not None else ("conv1", "conv2", "bn1", "bn2")


def _why_not(blk) -> str | None:
    """None when the block's first and last conv can share one weight; else the reason."""
    if getattr(blk, "downsample", None) is not None:
        return "first block of a stage: the shortcut changes width (downsample), the pair is not transposable"
    names = _pair(blk)
    first, last, bn_a, bn_b = (getattr(blk, n, None) for n in names)
    if not (type(first) is nn.Conv2d and type(last) is nn.Conv2d):
        return f"{names[0]}/{names[1]} are not plain Conv2d (already rewritten?)"
    for c in (first, last):
        k = c.kernel_size[0]
        if (c.bias is not None or c.groups != 1 or c.stride != (1, 1) or c.dilation != (1, 1) or c.kernel_size != (k, k)
                or c.padding != ((k - 1) // 2,) * 2 or k % 2 == 0 or c.padding_mode != "zeros"):
            return "convs must be bias-free, ungrouped, stride 1, odd square kernels with 'same' zero padding"
    if last.weight.shape != first.weight.transpose(0, 1).shape:
        return f"shapes {tuple(first.weight.shape)} and {tuple(last.weight.shape)} are not transposes"
    for bn in (bn_a, bn_b):
        if not (isinstance(bn, nn.BatchNorm2d) and bn.affine and bn.running_mean is not None):
            return "the convs must be followed by affine BatchNorm with running statistics"
    return None


def _fit(pairs: list[tuple[torch.Tensor, torch.Tensor]], iters: int = 30):
    """One W for all pairs: W ~ r_b * A_b (rows) ~ B_b * c_b (columns), alternating least squares.

    A_b is the first conv's weight (m, C, k, k); B_b the last conv's mapped into the same layout
    (channels swapped, kernels flipped). W keeps A_0's norm so the scales cannot collapse to zero.
    """
    w = pairs[0][0].clone()
    norm = w.norm()
    for _ in range(iters):
        rs = [(a * w).sum((1, 2, 3)) / (a * a).sum((1, 2, 3)).clamp_min(1e-300) for a, _ in pairs]
        cs = [(b * w).sum((0, 2, 3)) / (b * b).sum((0, 2, 3)).clamp_min(1e-300) for _, b in pairs]
        w = sum(r[:, None, None, None] * a + b * c[None, :, None, None] for (a, b), r, c in zip(pairs, rs, cs)) / (2 * len(pairs))
        w = w * (norm / w.norm().clamp_min(1e-300))
    return w


def _old_per_new(old: torch.Tensor, w: torch.Tensor, dims: tuple) -> torch.Tensor:
    """beta with old ~ beta * W per output channel of the conv (least squares): the conv's old output ~ beta * new.

    Regressing old on new (not new on old) damps a channel the shared W cannot express
    (beta -> 0) instead of amplifying it; exact when old = W / r.
    """
    return (old * w).sum(dims) / (w * w).sum(dims).clamp_min(1e-300)


@torch.no_grad()
def _absorb(bn: nn.BatchNorm2d, beta: torch.Tensor) -> None:
    """The conv before `bn` now gives y with old ~ beta * y: bn(beta * y) = (gamma beta / sd) y + bias - gamma mean / sd.

    Written with mean 0 and the shift in the bias, so beta may be zero or negative.
    """
    sd = (bn.running_var.double() + bn.eps).sqrt()
    gamma, mean = bn.weight.double(), bn.running_mean.double()
    bn.bias.copy_((bn.bias.double() - gamma * mean / sd).to(bn.bias.dtype))
    bn.weight.copy_((gamma * beta).to(bn.weight.dtype))
    bn.running_mean.zero_()


def _install(blocks, group: list[int], weight: torch.Tensor) -> nn.Parameter:
    shared = nn.Parameter(weight)
    for n, b in enumerate(group):
        blk = blocks[b]
        a, z, _, _ = _pair(blk)
        pad = getattr(blk, a).padding[0]
        setattr(blk, a, TiedConv(shared, pad, transpose=False, owner=n == 0))
        setattr(blk, z, TiedConv(shared, pad, transpose=True, owner=False))
    return shared


def _groups(blocks, eligible: list[int], staged: bool) -> list[list[int]]:
    """Staged: runs of consecutive eligible blocks with equal shapes (a stage's first block breaks a run)."""
    if not staged:
        return [[b] for b in eligible]
    runs: list[list[int]] = []
    for b in eligible:
        shape = getattr(blocks[b], _pair(blocks[b])[0]).weight.shape
        prev = runs[-1][-1] if runs else None
        if prev == b - 1 and getattr(blocks[prev], _pair(blocks[prev])[0]).weight.shape == shape:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


def tie_resnet(model, adapter, cfg, ctx, note: str):
    blocks = adapter.res_blocks(model)
    idx = select(cfg.blocks, len(blocks), "tie_rowcol")
    if ctx.replay is not None:
        for group in ctx.replay["groups"]:
            first = getattr(blocks[group[0]], _pair(blocks[group[0]])[0])
            _install(blocks, group, torch.zeros_like(first.weight))
        return PassResult(model, [], ctx.replay)
    why = {b: _why_not(blocks[b]) for b in idx}
    eligible = [b for b in idx if why[b] is None]
    if not eligible:
        raise InputError(f"tie_rowcol: none of blocks {idx} can be tied (e.g. block {idx[0]}: {why[idx[0]]})" if idx
                         else "tie_rowcol: no blocks selected")
    groups = _groups(blocks, eligible, cfg.staged)
    details = {"groups": groups, "staged": cfg.staged, "fit_error": {}, "flops_change": "none",
               "skipped": {str(b): w for b, w in why.items() if w is not None}}
    changes, saved = [], 0
    with torch.no_grad():
        for group in groups:
            names = [_pair(blocks[b]) for b in group]
            convs = [(getattr(blocks[b], n[0]), getattr(blocks[b], n[1])) for b, n in zip(group, names)]
            pairs = [(f.weight.double(), l.weight.double().flip(2, 3).transpose(0, 1)) for f, l in convs]
            w = _fit(pairs)
            before = sum(f.weight.numel() + l.weight.numel() for f, l in convs)
            for b, n, (a, bb) in zip(group, names, pairs):
                r, c = _old_per_new(a, w, (1, 2, 3)), _old_per_new(bb, w, (0, 2, 3))
                _absorb(getattr(blocks[b], n[2]), r)
                _absorb(getattr(blocks[b], n[3]), c)
                err = max(float((a - r[:, None, None, None] * w).norm() / a.norm()),
                          float((bb - c[None, :, None, None] * w).norm() / bb.norm()))
                details["fit_error"][str(b)] = err
            dtype = convs[0][0].weight.dtype
            _install(blocks, group, w.to(dtype))
            saved += before - w.numel()
            changes.append(f"blocks {group}: {names[0][1]} := {names[0][0]}^T, one {tuple(w.shape)} weight "
                           f"(BN refolded), weight fit error up to {100 * max(details['fit_error'][str(b)] for b in group):.0f}%")
    changes.insert(0, f"tied {len(eligible)} blocks in {len(groups)} weight group(s){' (staged)' if cfg.staged else ''}: "
                      f"{saved:,} parameters removed; {note}")
    changes += [f"block {b}: not tied, {w}" for b, w in details["skipped"].items()]
    return PassResult(model, changes, details)
