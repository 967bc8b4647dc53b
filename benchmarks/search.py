"""Fitting recipes to a FLOP budget before any training: dry rewrites on the calibration batch.

This tool's contender per budget is the candidate recipe with the lowest KL to the teacher
on calibration images after the rewrite (before distillation), among those within budget.
"""
from __future__ import annotations

import json
from typing import Callable

from compress.errors import InputError
from compress.pipeline import rewrite
from compress.recipe import parse_recipe

from .contenders import has_lowrank

LOWRANK_WHITENED = "whitened_svd"  # the lowrank pass's output-aware method (DESIGN.md §3)
LOWRANK_PLAIN = "svd"  # plain weight SVD truncation
SLACK = 1.02  # a contender may exceed its FLOP budget by 2% (widths and ranks are rounded)


ALLOCATIONS = ("greedy", "uniform")  # how lowrank spreads a target over layers (both are tried for ours)


def lowrank(method: str, target: float, allocate: str = "greedy") -> dict:
    cfg = {"method": method, "target": round(target, 4)}
    return {"lowrank": cfg if allocate == "greedy" else {**cfg, "allocate": allocate}}


class Search:
    """Dry rewrites of one teacher on one calibration batch, memoised across budgets."""

    def __init__(self, loaded, calib, *, iters: int, windows: str):
        self.loaded, self.calib, self.iters, self.windows = loaded, calib, iters, windows
        self._seen: dict[str, dict] = {}

    def dry(self, passes: list) -> dict:
        """FLOP ratio and calibration fidelity of a pass list (no export, no training)."""
        key = json.dumps(passes, sort_keys=True)
        if key not in self._seen:
            recipe = parse_recipe({"version": 1, "passes": passes})
            _, ledger, _, _ = rewrite(self.loaded, recipe, self.calib, log=lambda _m: None)
            last = ledger[-1]
            self._seen[key] = {"passes": passes, "flops_ratio": last["flops"][1] / ledger[0]["flops"][0],
                               "kl": last["vs_teacher"]["kl"], "agreement": last["vs_teacher"]["agreement"]}
        return self._seen[key]

    def fit(self, make: Callable[[float], list], budget: float) -> dict | None:
        """Bisect a knob in (0, 1] (FLOPs grow with it) for the largest FLOPs within budget."""
        lo, hi, best = 0.0, 1.0, None
        for _ in range(self.iters):
            mid = (lo + hi) / 2
            try:
                got = self.dry(make(mid))
            except InputError:  # e.g. lowrank: a target below what the smallest ranks can reach
                lo = mid
                continue
            if got["flops_ratio"] <= budget * SLACK:
                best, lo = got, mid
            else:
                hi = mid
        return best

    def svd(self, budget: float) -> dict | None:
        """Plain weight-SVD truncation, with whichever allocation keeps the teacher better (as for ours)."""
        if not has_lowrank():
            return None
        fits = [self.fit(lambda t, a=a: [lowrank(LOWRANK_PLAIN, t, a)], budget) for a in ALLOCATIONS]
        return min((f for f in fits if f), key=lambda f: f["kl"], default=None)

    def _strip(self, k: int, n: int) -> dict | None:
        """The window of k consecutive blocks whose MLP stripping keeps the teacher best."""
        if k == 0:
            return None
        starts = range(n - k + 1) if self.windows == "all" else [(n - k) // 2]
        return min((self.dry([{"mlp_strip": {"blocks": list(range(s, s + k))}}]) for s in starts), key=lambda w: w["kl"])

    def ours(self, budget: float, log) -> tuple[dict | None, list[dict]]:
        """The best of this tool's candidate recipes at a budget, and every candidate tried.

        ViT: MLP stripping of the fewest blocks that meet the budget (the best window of k
        consecutive blocks by calibration KL), and up to four shallower strips topped up with
        whitened low-rank factorisation.
        ResNet: whitened low-rank factorisation.
        Every low-rank candidate is tried with both allocations (greedy and uniform).
        """
        tried = []
        if self.loaded.adapter.family == "vit":
            n = len(self.loaded.model.blocks)
            strips = [self._strip(k, n) for k in range(n + 1)]
            fits = [k for k in range(1, n + 1) if strips[k]["flops_ratio"] <= budget * SLACK]
            if fits:  # more stripping than the fewest blocks that meet the budget only wastes it
                tried.append(strips[fits[0]])
            top = fits[0] - 1 if fits else n
            if has_lowrank():  # a few strip depths below that, topped up with low rank
                for k in sorted({0, (top + 1) // 2, top - 1, top} - {-1}):
                    for a in ALLOCATIONS:
                        got = self.fit(lambda t, s=strips[k], a=a: (s["passes"] if s else []) +
                                       [lowrank(LOWRANK_WHITENED, t, a)], budget)
                        tried += [got] if got else []
        elif has_lowrank():
            for a in ALLOCATIONS:
                got = self.fit(lambda t, a=a: [lowrank(LOWRANK_WHITENED, t, a)], budget)
                tried += [got] if got else []
        for t in tried:
            log(f"  candidate {t['passes']}: FLOPs {t['flops_ratio']:.1%}, calibration KL {t['kl']:.4f}")
        return (min(tried, key=lambda t: t["kl"]) if tried else None), tried
