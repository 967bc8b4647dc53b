"""Least squares behind the `width` pass: which input units of a consumer layer to keep, and its refit.

The consumer sees features X (tokens or conv patches, a ones column appended for the bias) and
should keep producing the teacher's outputs Y. Units are removed greedily by the optimal-brain-
surgeon cost of dropping them with the others refit (Hassibi & Stork; group form for a conv's
k*k columns), `multiple` at a time, so one pass gives the removal order and the error curve.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_ROWS = 8192  # rows per float64 Gram update, to bound the memory of big calibration batches
GREEDY_COLUMNS = 2048  # above this many columns, units are ranked once (one inverse) instead of greedily
ROUNDS = 16  # greedy removal re-scores the units at most about this many times


@dataclass
class Problem:
    """Normal equations of one consumer: G = X1^T X1, C = X1^T Y (X1 = [X, 1]), output energies."""

    g: torch.Tensor  # (f + 1, f + 1) float64
    c: torch.Tensor  # (f + 1, out) float64
    yy: float  # ||Y||^2
    centred: float  # ||Y - mean(Y)||^2: the scale errors are relative to
    group: int  # columns per unit (1 for a Linear, k*k for a conv)
    rows: int  # calibration rows behind G

    @property
    def units(self) -> int:
        return (self.g.shape[0] - 1) // self.group


def problem(x: torch.Tensor, y: torch.Tensor, group: int = 1) -> Problem:
    """x: (rows, f) features, y: (rows, out) targets."""
    f = x.shape[1]
    g = torch.zeros(f + 1, f + 1, dtype=torch.float64)
    c = torch.zeros(f + 1, y.shape[1], dtype=torch.float64)
    ysum = torch.zeros(y.shape[1], dtype=torch.float64)
    yy = 0.0
    for i in range(0, len(x), CHUNK_ROWS):
        xs = x[i:i + CHUNK_ROWS].double()
        ys = y[i:i + CHUNK_ROWS].double()
        x1 = torch.cat([xs, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
        g += x1.T @ x1
        c += x1.T @ ys
        ysum += ys.sum(0)
        yy += float((ys * ys).sum())
    n = len(x)
    return Problem(g, c, yy, max(yy - float(ysum @ ysum) / max(n, 1), 1e-30), group, n)


def _lam(p: Problem, ridge: float) -> float:
    """Ridge lambda relative to the mean feature energy, raised where there are fewer calibration rows than
    columns (a ResNet's last stage at 64 px sees 4 positions per image)."""
    f = p.g.shape[0] - 1
    return ridge * max(1.0, f / max(p.rows, 1)) * float(p.g.diagonal()[:f].mean().clamp_min(1e-30))


def _ridged(p: Problem, ridge: float) -> torch.Tensor:
    """G + lambda*I on the feature columns (not the bias)."""
    g = p.g.clone()
    g.diagonal()[:-1] += _lam(p, ridge)
    return g


def interpolate(curve: dict[int, float], widths: list[int]) -> dict[int, float]:
    """The curve at every width, linear between the widths it was measured at."""
    known = sorted(curve)
    out = {}
    for w in widths:
        lo = max([k for k in known if k <= w], default=known[0])
        hi = min([k for k in known if k >= w], default=known[-1])
        out[w] = curve[lo] if hi == lo else curve[lo] + (curve[hi] - curve[lo]) * (w - lo) / (hi - lo)
    return out


def columns(units: list[int] | torch.Tensor, group: int) -> torch.Tensor:
    u = torch.as_tensor(units, dtype=torch.long)
    return (u[:, None] * group + torch.arange(group)).reshape(-1)


def refit(p: Problem, keep: list[int], ridge: float, prior: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """Least-squares weights (out, len(keep)*group [+ 1]) of the kept units' columns, the bias last.

    The ridge pulls towards `prior` (out, len(keep)*group), the consumer's own weights on those columns,
    not towards zero: with few calibration rows the refit then stays near the plain slice instead of
    fitting the calibration images.
    """
    cols = columns(keep, p.group)
    f = len(cols)
    cols = torch.cat([cols, torch.tensor([p.g.shape[0] - 1] if bias else [], dtype=torch.long)])
    g = _ridged(p, ridge)[cols][:, cols]
    rhs = p.c[cols].clone()
    rhs[:f] += _lam(p, ridge) * prior.double().T
    return torch.linalg.solve(g, rhs).T


def removal_order(p: Problem, keep: int, multiple: int, ridge: float) -> tuple[list[int], dict[int, float]]:
    """Units in the order greedy OBS removes them, down to `keep` left, and the relative output error of the
    refit layer at each width it passes (multiples of `multiple`, at most about ROUNDS of them, then `keep`)."""
    h = torch.cholesky_inverse(torch.linalg.cholesky(_ridged(p, ridge)))  # inverse Hessian of the kept columns (removed ones become zero)
    w = p.c.T @ h  # (out, f + 1): the current least-squares weights
    alive = torch.ones(p.units, dtype=torch.bool)
    order, curve = [], {}
    blocks = columns(list(range(p.units)), p.group).view(p.units, p.group)
    left = p.units
    stride = multiple * max(1, -(-(left - keep) // (multiple * ROUNDS)))
    once = p.g.shape[0] > GREEDY_COLUMNS  # too wide to downdate per step: score once, drop in that order
    ranked = None
    while left > keep:
        step = min(left % multiple or stride, left - keep)  # land on multiples of `multiple`
        if once and ranked is not None:
            drop = ranked[:step]
            ranked = ranked[step:]
            order += drop.tolist()
            left -= step
            curve[left] = curve.get(left + step, 0.0) + float(costs[drop].sum()) / p.centred
            continue
        idx = blocks[alive]  # (U, group)
        hb = h[idx[:, :, None], idx[:, None, :]]  # (U, group, group)
        wb = w[:, idx]  # (out, U, group)
        cost = torch.einsum("oug,ugh,ouh->u", wb, torch.linalg.inv(hb), wb)
        if once:  # one-shot OBS: rank every unit by its cost with all the others present
            costs = torch.zeros(p.units, dtype=torch.float64)
            costs[alive] = cost
            ranked = alive.nonzero().squeeze(1)[torch.argsort(cost)]
            continue
        drop = alive.nonzero().squeeze(1)[torch.argsort(cost)[:step]]
        cols = columns(drop, p.group)
        hrr = torch.linalg.inv(h[cols][:, cols])
        w = w - (w[:, cols] @ hrr) @ h[cols]
        h = h - h[:, cols] @ hrr @ h[cols]
        w[:, cols] = 0
        alive[drop] = False
        order += drop.tolist()
        left -= step
        curve[left] = max((p.yy - float((w * p.c.T).sum())) / p.centred, 0.0)  # ||Y - X W^T||^2 at the optimum
    return order, curve
