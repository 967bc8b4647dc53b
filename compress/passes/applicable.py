"""One line for a pass that cannot run on a model: the module types it saw and the pass that applies instead."""
from __future__ import annotations

from torch import nn

from ..adapters.generic import module_types
from ..core.errors import InputError
from ..core.registry import all_passes


def instead(model_family: str, exclude: str) -> str:
    """The passes that do apply to this family (lowrank applies to every model: it works on plain layers)."""
    names = [n for n, s in all_passes().items() if model_family in s.families and n != exclude]
    return ", ".join(sorted(names)) or "none (export, distill and verify still run)"


def inapplicable(name: str, spec, adapter, model: nn.Module, note: str | None = None) -> str:
    need = "/".join(sorted(spec.families))
    seen = note if note and adapter.family == "other" else f"module types of this {type(model).__name__}: {module_types(model)}"
    return (f"pass '{name}' does not apply to {adapter.name} models (it needs family {need}); "
            f"{seen}; passes that apply: {instead(adapter.family, name)}")


def unexpected(name: str, model: nn.Module, e: Exception) -> str:
    """A pass met a structure it was not written for (an AttributeError inside it): exit 2, not a crash."""
    return (f"pass '{name}' cannot handle this {type(model).__name__}'s structure ({type(e).__name__}: {e}); module "
            f"types: {module_types(model)}; lowrank works on any model's plain Linear/Conv2d layers")


def why_not(name: str, spec, adapter, model: nn.Module, note: str | None = None) -> str | None:
    """Why pass `name` cannot run on this model (one line), or None: its family is not the pass's, or the pass
    rewrites transformer blocks and this model's do not map to the neutral block (which maps them, in place)."""
    if adapter.family not in spec.families:
        return inapplicable(name, spec, adapter, model, note)
    if spec.vit_blocks and adapter.family == "other":
        try:
            adapter.vit_blocks(model)
        except InputError as e:
            seen = "" if "module types" in str(e) else f" ({note or 'module types: ' + module_types(model)}); lowrank works on any model's plain Linear/Conv2d layers"
            return f"pass '{name}' does not apply to this {type(model).__name__}: {e}{seen}"
    return None
