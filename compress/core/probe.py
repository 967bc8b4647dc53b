"""Forward hooks shared by the analysis and the data-driven passes: capture, and skip (ablate) a branch."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last hook of a `capture(..., stop=True)`: the rest of the forward is not needed."""


@torch.no_grad()
def capture(model: nn.Module, modules: list[nn.Module], x: torch.Tensor, *, inputs: bool = False,
            stop: bool = False) -> list[torch.Tensor]:
    """Each module's output (or its first input) when `model` runs on x, detached. stop: end the forward once every
    module has been called (its first call is kept): a layer-by-layer refit of a 240-px EfficientNet-Lite1 ran two
    whole forwards over the calibration batch per layer."""
    got: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(mod, args, out):
            if stop and i in got:
                return
            got[i] = (args[0] if inputs else out).detach()
            if stop and len(got) == len(modules):
                raise _Stop
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in range(len(modules))]


@contextmanager
def zeroed(modules: list[nn.Module]):
    """Within the block, each module's output is replaced by zeros: a residual branch is skipped."""
    handles = [m.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(teacher || model) per image, in float64."""
    return float(torch.nn.functional.kl_div(logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


def skip_kl(model, branch, x, ref) -> float:
    """KL to `ref` with one residual branch skipped."""
    with zeroed([branch]), torch.no_grad():
        return kl(ref, model(x))


def greedy_mlp_skip(model, adapter, x: torch.Tensor, k: int) -> list[dict]:
    """Choose k MLPs to remove: each round skips the one whose removal (on top of those chosen) costs the
    least KL against the unmodified model. Returns [{block, kl}] in the order chosen, kl cumulative."""
    blocks = adapter.vit_blocks(model)
    with torch.no_grad():
        ref = model(x)
    chosen: list[dict] = []
    cands = [i for i, b in enumerate(blocks) if b.mlp is not None]
    for _ in range(min(k, len(cands))):
        gone = [blocks[c["block"]].ls2 for c in chosen]
        with zeroed(gone):
            scores = {i: skip_kl(model, blocks[i].ls2, x, ref) for i in cands}
        best = min(scores, key=scores.get)
        chosen.append({"block": best, "kl": round(scores[best], 6)})
        cands.remove(best)
    return chosen
