"""Pass registry: recipe name -> (function, config class, exactness, families it applies to)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict

from .errors import InputError


class PassConfig(BaseModel):
    """Base for pass configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def is_exact(self) -> bool:  # overridden by passes whose exactness depends on the mode
        raise NotImplementedError

    def needs_data(self) -> str | None:
        """What this configuration fits on calibration images, or None: such a pass refuses to fit on random inputs
        unless the recipe asks for them (calibration: {data: random}); fitted on noise it loses far more."""
        return None


@dataclass
class PassContext:
    """What a pass may read besides the model: a calibration batch (already preprocessed).

    `replay` is set only when `load_compressed` rebuilds a result's structure: it is the
    `details` dict this pass returned in the original run (calib is then None). A pass whose
    structure depends on data (ranks chosen by a budget, blocks chosen by analysis) must put
    what it chose into `details` (JSON-serialisable) and, given `replay`, rebuild exactly that;
    weight values do not matter then, they are loaded strictly afterwards.
    """

    calib: torch.Tensor | None  # None when a pass is replayed for structure only (load_compressed)
    replay: dict | None = None
    # a caller rewriting the same model (same weights, same calib) many times, as the planner does, may give one
    # dict per model state: a pass keeps there what does not depend on its target (lowrank's bases)
    memo: dict | None = None


@dataclass
class PassResult:
    model: torch.nn.Module
    changes: list[str] = field(default_factory=list)  # human-readable ledger lines
    details: dict[str, Any] = field(default_factory=dict)  # machine-readable, goes to report.json
    # the result's float32 logits on ctx.calib in eval mode, when the pass already ran them (lowrank's allocation
    # trial of the winner): the pipeline then does not run the model again (a ViT-L forward on 16 images: 8 s)
    logits: torch.Tensor | None = None
    # the float32 logits on ctx.calib of the model as the pass received it, from a forward the pass needed anyway
    # (lowrank's statistics): for a first pass these are the teacher's, and the pipeline skips its own forward
    input_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class PassSpec:
    name: str
    fn: Callable[..., PassResult]
    config_cls: type[PassConfig]
    families: frozenset[str]
    summary: str
    fits_batchnorm: bool = False  # it fits BatchNorm running statistics: distillation must not re-estimate them
    input_logits: bool = False  # it always returns PassResult.input_logits (outside replay)
    vit_blocks: bool = False  # it rewrites transformer blocks: on a model of no family, only where they map




_PASSES: dict[str, PassSpec] = {}


def register_pass(name: str, config_cls: type[PassConfig], *, families: set[str], summary: str,
                  fits_batchnorm: bool = False, input_logits: bool = False, vit_blocks: bool = False):
    def deco(fn):
        if name in _PASSES:
            raise RuntimeError(f"pass {name!r} registered twice")
        _PASSES[name] = PassSpec(name, fn, config_cls, frozenset(families), summary, fits_batchnorm, input_logits,
                                 vit_blocks)
        return fn

    return deco


def get_pass(name: str) -> PassSpec:
    if name not in _PASSES:
        close = difflib.get_close_matches(name, list(_PASSES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"unknown pass '{name}'{hint}; known passes: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def all_passes() -> dict[str, PassSpec]:
    return dict(_PASSES)
