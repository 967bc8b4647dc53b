"""The top-1 drop gate, decided knowing its sampling error (stats.drop_interval): a drop measured on 2,000 images
with ~7% of predictions changed carries about +-0.6 pt of noise, so a -0.85 pt result can be -1.7 pt on the next
2,000 images (the planner's ResNet 2.0x run). The gate holds on the interval's upper end unless gates.accuracy
is point."""
from __future__ import annotations

from .stats import images_to_resolve


def accuracy_gate(name: str, bound: float, mode: str, ci: dict) -> dict:
    """A gate record: measured = the interval's upper end (interval) or the drop itself (point); both kept, and how
    many images would resolve an interval that straddles the bound."""
    measured = ci["hi"] if mode == "interval" else ci["drop"]
    need = images_to_resolve(ci, bound)
    return {"gate": name, "target": bound, "measured": measured, "ok": bool(measured <= bound), "basis": mode,
            "drop": ci["drop"], "interval": [ci["lo"], ci["hi"]], "images": ci["images"],
            **({"images_to_resolve": need} if need is not None else {})}


def gate_basis(g: dict) -> str:
    """What a gate's measured figure is, for an accuracy gate: ' (upper end of ...)' or ' (point; ...)'; else ''."""
    if "interval" not in g:
        return ""
    lo, hi = g["interval"]
    head = (f"upper end of the 95% paired interval {lo:.2f} to {hi:.2f} around {g['drop']:.2f}"
            if g["basis"] == "interval" else f"the drop itself; 95% paired interval {lo:.2f} to {hi:.2f}")
    need = (f"; about {g['images_to_resolve']} images would resolve it against {g['target']}"
            if "images_to_resolve" in g else "")
    return f" ({head}, {g['images']} images{need})"
