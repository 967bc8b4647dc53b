"""The plan as people read it: each candidate in a phrase, the candidate table (speedups with their 95% interval),
and the summary the report keeps. Formatting only; the choice is made in plan.py."""
from __future__ import annotations


def reach(r: dict, t) -> str:
    """What a candidate reaches, in the terms of the target (for the out-of-reach error)."""
    bits = [f"FLOPs {r['flops_ratio']:.0%}", f"params {r['params_ratio']:.0%}"]
    if "speedup" in r:
        bits.append(f"{r['speedup'][str(t.batch)]:.2f}x at batch {t.batch}")
    if r.get("bytes"):
        bits.append(f"{r['bytes'] / 1e6:.2f} MB")
    return ", ".join(bits)


def target_text(t) -> str:
    """A target in one phrase: its figures, and the batch a speed is measured at."""
    keys = ("speedup", "latency_ms", "flops", "params", "size_mb")
    return ", ".join(f"{k} {getattr(t, k)}" for k in keys if getattr(t, k) is not None) + (
        f" (batch {t.batch})" if t.speedup or t.latency_ms else "")


def describe(row: dict) -> str:
    """A candidate in one short phrase: its passes and the file variant."""
    parts = []
    for p in row["passes"]:
        (name, cfg), = p.items()
        if name == "mlp_strip":
            b = cfg["blocks"]
            parts.append(f"strip auto {cfg['fraction']}" if b == "auto" else "strip " + ",".join(map(str, b)))
        elif name in ("lowrank", "width", "token_merge") and "target" in cfg:
            parts.append(f"{name} {cfg['target']:.3g} {cfg.get('allocate', '')}".strip())
        else:
            parts.append(f"{name} {cfg.get('mode', '')}".strip())
    return (" + ".join(parts) or "teacher") + ("" if row["variant"] == "fp32" else f" [{row['variant']}]")


def table(result: dict) -> tuple[list[tuple], int]:
    """Rows for report.align, one per measured candidate (lowest KL first, the choice marked *), and how
    many candidates were left out (beyond reach on FLOPs/params, or not timed once one met the target)."""
    bss = sorted(result["teacher"].get("p50_ms", {}), key=int)
    tb = str(result["target"].get("batch"))
    out = [("", "candidate", "FLOPs", "params", *[f"speedup b{b}" for b in bss], "MB",
            "KL held-out" if any(r.get("scored_on") == "holdout" for r in result["rows"]) else "KL", "agree", "meets")]
    rows = result["rows"]
    shown = sorted((i for i, r in enumerate(rows) if r.get("measured")), key=lambda i: (rows[i]["kl"], i))
    for i in shown:
        r = rows[i]
        out.append(("*" if i == result["choice"] else "", describe(r), f"{r['flops_ratio']:.1%}", f"{r['params_ratio']:.1%}",
                    *[_speed_text(r, b) for b in bss],
                    f"{r['bytes'] / 1e6:.2f}" if r.get("bytes") else "-", f"{r['kl']:.4f}",
                    f"{100 * r['agreement']:.1f}%", ("yes" if i in result["ranked"] else "no")
                    + (f" (again: {r['confirm']['speedup'][tb]:.2f}x)" if "confirm" in r else "")))
    return out, len(rows) - len(shown)


def _speed_text(r: dict, b: str) -> str:
    """A row's speedup at batch b, with its 95% interval when the run times were kept: "1.60x (1.55-1.64)"."""
    if "speedup" not in r:
        return "-"
    iv = r.get("interval", {}).get(b)
    return f"{r['speedup'][b]:.2f}x" + (f" ({iv['lo']:.2f}-{iv['hi']:.2f})" if iv else "")


def summary(result: dict) -> dict:
    """The plan as the report keeps it: the table (rendered rows), the choice, and the raw candidate rows."""
    rows, left = table(result)
    choice = result["choice"]
    return {**{k: result[k] for k in ("target", "teacher", "met_by_teacher", "timed_rows", "seconds", "ranked")},
            "choice": describe(result["rows"][choice]) if choice is not None else None,
            "table": [list(r) for r in rows], "left_out": left, "rows": result["rows"]}
