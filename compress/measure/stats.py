"""Sampling error of the measurements decisions are made on: timings (per-round speedup ratios) and top-1 on a
finite set of images (paired intervals). numpy only.

A point estimate is a draw: the planner's ResNet 2.0x run measured a -0.85 pt drop on 2,000 images and passed a
1.0 pt gate; 2,000 other images gave -1.7 pt. A speedup of 1.60x in the plan was 1.42x in the gate on a busy
machine. A decision that holds on an interval's bound holds for the next draw too, 39 times in 40.
"""
from __future__ import annotations

import math

import numpy as np

CONF = 0.95
RESAMPLES = 4000


def median_interval(values, conf: float = CONF) -> tuple[float, float]:
    """Distribution-free interval for a median: order statistics k and n-k+1 of the sorted values, k the largest
    with P(Binomial(n, 1/2) < k) <= (1 - conf)/2. Fewer than 6 values cannot reach 95%: the range then."""
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    tail, cdf, k = (1 - conf) / 2, 0.0, 0
    while k < n:  # cdf = P(B <= k - 1) for the k about to be accepted
        nxt = cdf + math.comb(n, k) / 2 ** n
        if nxt > tail:
            break
        cdf, k = nxt, k + 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def speedup_interval(teacher_ms, model_ms, conf: float = CONF) -> dict:
    """Speedup of a file timed interleaved with the teacher: the point (teacher p50 / file p50, what the gate
    reads) and an interval for the median of the per-round ratios (each round runs both back to back, so a busy
    moment slows both and cancels in the ratio)."""
    t, m = np.asarray(teacher_ms, float), np.asarray(model_ms, float)
    if len(t) != len(m) or not len(t):
        raise ValueError(f"per-round timings must pair up (got {len(t)} teacher and {len(m)} file rounds)")
    point = float(np.median(t) / np.median(m))
    lo, hi = median_interval(t / m, conf)
    return {"speedup": point, "lo": min(lo, point), "hi": max(hi, point), "rounds": len(t), "conf": conf}


def p50_upper(model_ms, conf: float = CONF) -> float:
    """The upper end of the interval for a file's median latency (a latency_ms target holds on it)."""
    return median_interval(model_ms, conf)[1]


def _bootstrap_mean(values: np.ndarray, conf: float, seed: int, resamples: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of values in {-1, 0, 1} (or {0, 1}): a resample is a multinomial
    draw of the three counts, exact and O(resamples) however many images there are."""
    n = len(values)
    levels = np.array([-1.0, 0.0, 1.0])
    p = np.array([(values == v).mean() for v in levels])
    counts = np.random.default_rng(seed).multinomial(n, p / p.sum(), size=resamples)
    means = counts @ levels / n
    a = (1 - conf) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def top1_interval(correct, conf: float = CONF, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """top-1 (a share) with its bootstrap interval over the images."""
    c = np.asarray(correct, dtype=float)
    lo, hi = _bootstrap_mean(c, conf, seed, resamples)
    return {"top1": float(c.mean()), "lo": lo, "hi": hi, "images": len(c), "conf": conf}


def drop_interval(ref_correct, correct, conf: float = CONF, seed: int = 0, resamples: int = RESAMPLES) -> dict:
    """The top-1 drop (points, teacher minus model) with a paired bootstrap interval over the images: both models
    are scored on the same images, so only the images where exactly one of them is right carry the noise."""
    r, c = np.asarray(ref_correct, dtype=float), np.asarray(correct, dtype=float)
    if r.shape != c.shape or not len(r):
        raise ValueError(f"paired predictions must cover the same images (got {r.shape} and {c.shape})")
    d = r - c
    lo, hi = _bootstrap_mean(d, conf, seed, resamples)
    return {"drop": 100 * float(d.mean()), "lo": 100 * lo, "hi": 100 * hi, "images": len(d),
            "discordant": float((d != 0).mean()), "conf": conf}


def images_to_resolve(ci: dict, bound: float, key: str = "drop") -> int | None:
    """How many images would put the interval wholly on one side of `bound` (its half-width shrinks as
    1/sqrt(images)), when it straddles the bound now; None when it is already resolved or the point sits on it."""
    if ci["hi"] <= bound or ci["lo"] > bound:
        return None
    margin = abs(bound - ci[key])
    if margin == 0:
        return None
    half = max(ci["hi"] - ci[key], ci[key] - ci["lo"])
    return math.ceil(ci["images"] * (half / margin) ** 2)


def timing_intervals(res: dict, key: str, teacher: str = "teacher") -> dict:
    """Per batch size, from an ort_timing.latency(keep_times=True) result: the speedup interval of `key` against
    the teacher ("lo", "hi") and the upper end of its p50 ("p50_hi"). Empty where the result has no run times."""
    out = {}
    for bs, d in res[key].items():
        t = res[teacher][bs].get("times_ms")
        if t is None or "times_ms" not in d:
            continue
        s = speedup_interval(t, d["times_ms"])
        out[bs] = {"lo": s["lo"], "hi": s["hi"], "p50_hi": p50_upper(d["times_ms"]), "rounds": s["rounds"]}
    return out
