"""Fitting recipes to a FLOP budget before any training: dry rewrites on the calibration batch.

This tool's contender per budget is the candidate recipe with the lowest KL to the teacher
on calibration images after the rewrite (before distillation), among those within budget.
"""
from __future__ import annotations

from typing import Callable

from compress.errors import InputError
from compress.pipeline import rewrite
from compress.recipe import parse_recipe

from .contenders import has_lowrank

LOWRANK_WHITENED = "whitened_svd"  # the lowrank pass's output-aware method (DESIGN.md §3)
LOWRANK_PLAIN = "svd"  # plain weight SVD truncation
SLACK = 1.02  # a contender may exceed its FLOP budget by 2% (widths and ranks are rounded)


def dry(loaded, calib, passes: list) -> dict:
    """FLOP ratio and calibration fidelity of a pass list (no export, no training)."""
    recipe = parse_recipe({"version": 1, "passes": passes})
    _, ledger, _, _ = rewrite(loaded, recipe, calib, log=lambda _m: None)
    last = ledger[-1]
    return {"passes": passes, "flops_ratio": last["flops"][1] / ledger[0]["flops"][0],
            "kl": last["vs_teacher"]["kl"], "agreement": last["vs_teacher"]["agreement"]}


def lowrank(method: str, target: float) -> dict:
    return {"lowrank": {"method": method, "target": round(target, 4)}}


def fit(loaded, calib, make: Callable[[float], list], budget: float, iters: int) -> dict | None:
    """Bisect a knob in (0, 1] (FLOPs grow with it) for the largest FLOPs within budget."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        try:
            got = dry(loaded, calib, make(mid))
        except InputError:  # e.g. lowrank: a target below what the smallest ranks can reach
            lo = mid
            continue
        if got["flops_ratio"] <= budget * SLACK:
            best, lo = got, mid
        else:
            hi = mid
    return best


def svd_recipe(loaded, calib, budget: float, iters: int) -> dict | None:
    if not has_lowrank():
        return None
    return fit(loaded, calib, lambda t: [lowrank(LOWRANK_PLAIN, t)], budget, iters)


def ours(loaded, calib, budget: float, iters: int, log) -> tuple[dict | None, list[dict]]:
    """The best of this tool's candidate recipes at a budget, and every candidate tried.

    ViT: MLP stripping of a window of k blocks (the best window per k by calibration KL),
    topped up with whitened low-rank factorisation when stripping alone is above budget.
    ResNet: whitened low-rank factorisation.
    """
    tried = []
    if loaded.adapter.family == "vit":
        n = len(loaded.model.blocks)
        best_window = {0: None}
        for k in range(1, n + 1):
            windows = [dry(loaded, calib, [{"mlp_strip": {"blocks": list(range(s, s + k))}}]) for s in range(n - k + 1)]
            best_window[k] = min(windows, key=lambda w: w["kl"])
        for k in range(n + 1):
            strip = [] if best_window[k] is None else best_window[k]["passes"]
            if best_window[k] is not None and best_window[k]["flops_ratio"] <= budget * SLACK:
                tried.append(best_window[k])
                break  # more stripping only wastes budget
            if has_lowrank():
                got = fit(loaded, calib, lambda t, s=strip: s + [lowrank(LOWRANK_WHITENED, t)], budget, iters)
                if got is not None:
                    tried.append(got)
    elif has_lowrank():
        got = fit(loaded, calib, lambda t: [lowrank(LOWRANK_WHITENED, t)], budget, iters)
        tried += [got] if got else []
    for t in tried:
        log(f"  candidate {t['passes']}: FLOPs {t['flops_ratio']:.1%}, calibration KL {t['kl']:.4f}")
    return (min(tried, key=lambda t: t["kl"]) if tried else None), tried
