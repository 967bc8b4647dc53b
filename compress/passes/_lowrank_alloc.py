"""How lowrank spreads a cost target over its layers: greedy or one uniform rank fraction, each topped up to the target.

A candidate is {"steps": [(rank, energy lost, cost), ...], "top": full rank, "even": break-even rank}; steps[0] is the
layer whole (rank None), the next ones go down in rank by `multiple`. `total` is the selected layers' whole cost.
Both allocations first land at or under the target, then `_fill` spends what is left of it one rank step at a time:
ranks move in steps of `multiple`, and stopping at the first allocation under the target left a resnet18 at 0.480
and a small ViT at 0.399 of a 0.5 budget (uniform: every layer steps down together).
"""
from __future__ import annotations

import heapq

from ..core.errors import InputError


def _within(cost: float, target: float, total: float) -> bool:
    return cost <= target * total * (1 + 1e-9)


def _check_reach(cost_at_smallest: float, target: float, total: float, budget: str) -> None:
    if not _within(cost_at_smallest, target, total):
        raise InputError(f"lowrank: target {target} is out of reach: at the smallest ranks the selected layers keep "
                         f"{cost_at_smallest / total:.0%} of their {budget}; raise target or select more layer kinds")


def _fill(cands: dict[str, dict], state: dict[str, int], target: float, total: float, whole: bool,
          once: bool) -> dict[str, int]:
    """Raise ranks one step at a time while the budget has room: each time the step that recovers the most energy per
    unit of cost among those that fit. `whole`: a layer may go back to unfactorised; `once`: each layer rises one step
    at most (uniform stays one fraction, give or take one multiple). Returns {layer: rank} of the factorised layers."""
    state, start = dict(state), dict(state)
    cost = total - sum(c["steps"][0][2] - c["steps"][state[n]][2] for n, c in cands.items())
    while True:
        room = target * total * (1 + 1e-9) - cost
        best = None
        for n, c in cands.items():
            i = state[n]
            if i == 0 or (i == 1 and not whole) or (once and i < start[n]):
                continue
            (_, e0, k0), (_, e1, k1) = c["steps"][i - 1], c["steps"][i]
            extra = k0 - k1
            if extra <= room and (best is None or (e1 - e0) / max(extra, 1e-12) > best[0]):
                best = ((e1 - e0) / max(extra, 1e-12), n, extra)
        if best is None:
            return {n: cands[n]["steps"][i][0] for n, i in state.items() if i > 0}
        state[best[1]] -= 1
        cost += best[2]


def greedy(cands: dict[str, dict], target: float, total: float, budget: str) -> dict[str, int]:
    """Take the cheapest error per unit of cost saved until the selected layers fit the budget, then fill it.

    Each layer's curve is its own fraction of output energy lost, so layers compare on one scale.
    """
    state = {n: 0 for n in cands}  # index into c["steps"]: 0 = unfactorised
    cost = total
    heap = []

    def push(n):
        c, i = cands[n], state[n]
        if i + 1 < len(c["steps"]):
            (r0, e0, k0), (r1, e1, k1) = c["steps"][i], c["steps"][i + 1]
            heapq.heappush(heap, ((e1 - e0) / max(k0 - k1, 1e-12), n))

    for n in cands:
        push(n)
    while cost > target * total and heap:
        _, n = heapq.heappop(heap)
        c = cands[n]
        cost -= c["steps"][state[n]][2] - c["steps"][state[n] + 1][2]
        state[n] += 1
        push(n)
    _check_reach(cost, target, total, budget)
    return _fill(cands, state, target, total, whole=True, once=False)


def uniform(cands: dict[str, dict], target: float, total: float, budget: str) -> dict[str, int]:
    """One rank fraction f of each layer's full rank (rounded down to the multiple), the largest meeting the target;
    then single steps of one multiple on the layers where they recover the most, while the target has room."""
    def pick(f):
        state, cost = {n: 0 for n in cands}, total
        for n, c in cands.items():
            if f * c["top"] >= c["even"]:  # at or above break-even: the layer stays whole
                continue
            i = next(i for i, st in enumerate(c["steps"]) if i and st[0] <= max(f * c["top"], c["steps"][-1][0]))
            state[n] = i
            cost -= c["steps"][0][2] - c["steps"][i][2]
        return state, cost

    _check_reach(pick(0.0)[1], target, total, budget)
    lo, hi = 0.0, 1.0
    for _ in range(30):  # cost grows with f: bisect for the largest f within the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _within(pick(mid)[1], target, total) else (lo, mid)
    return _fill(cands, pick(lo)[0], target, total, whole=False, once=True)
