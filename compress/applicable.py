"""One line for a pass that cannot run on a model: the module types it saw and the pass that applies instead."""
from __future__ import annotations

from torch import nn

from .adapters.generic import module_types
from .attn_obstacles import obstacle
from .registry import all_passes


def instead(model_family: str, exclude: str) -> str:
    """The passes that do apply to this family (lowrank applies to every model: it works on plain layers)."""
    names = [n for n, s in all_passes().items() if model_family in s.families and n != exclude]
    return ", ".join(sorted(names)) or "none (export, distill and verify still run)"


def inapplicable(name: str, spec, adapter, model: nn.Module, note: str | None = None) -> str:
    need = "/".join(sorted(spec.families))
    seen = note if note and adapter.family == "other" else f"module types of this {type(model).__name__}: {module_types(model)}"
    why = obstacle(model, name)  # qk_merge / vo: what in the attention stops it, read from its structure
    return (f"pass '{name}' does not apply to {adapter.name} models (it needs family {need}); {why + '; ' if why else ''}"
            f"{seen}; passes that apply: {instead(adapter.family, name)}")


def unexpected(name: str, model: nn.Module, e: Exception) -> str:
    """A pass met a structure it was not written for (an AttributeError inside it): exit 2, not a crash."""
    return (f"pass '{name}' cannot handle this {type(model).__name__}'s structure ({type(e).__name__}: {e}); module "
            f"types: {module_types(model)}; lowrank works on any model's plain Linear/Conv2d layers")
