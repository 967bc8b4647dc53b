"""MLP stripping (Bermeitinger et al.): drop the MLP branch of chosen blocks.

The MLP holds about two thirds of a ViT block's parameters and FLOPs, so this is the
largest real latency lever. `blocks: auto` with `fraction` removes the MLPs whose removal
costs the least teacher KL on calibration data (greedy: remove, re-measure). Approximate.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field, model_validator

from ..core.errors import InputError
from ..core.probe import greedy_mlp_skip
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSelOrAuto, select


class MLPStripConfig(PassConfig):
    blocks: BlockSelOrAuto
    fraction: Optional[float] = Field(None, gt=0, le=1)  # auto only: share of the blocks whose MLP goes

    @model_validator(mode="after")
    def _fraction_for_auto(self):
        if (self.blocks == "auto") != (self.fraction is not None):
            raise ValueError("fraction is required with blocks: auto and not allowed with a block list or all")
        return self

    def is_exact(self) -> bool:
        return False

    def needs_data(self) -> str | None:
        return "blocks: auto ranks blocks by KL on calibration images" if self.blocks == "auto" else None


def _auto(model, adapter, cfg: MLPStripConfig, ctx: PassContext) -> tuple[list[int], list[str], dict]:
    if ctx.replay is not None:
        if "blocks" not in ctx.replay:
            raise InputError("mlp_strip auto: the saved structure lists no chosen blocks; re-run compress apply")
        return list(ctx.replay["blocks"]), [], {}
    if ctx.calib is None:
        raise InputError("mlp_strip blocks: auto ranks blocks on calibration data; give the recipe calibration images")
    blocks = adapter.vit_blocks(model)
    k = int(cfg.fraction * len(blocks) + 0.5)  # round half up: 0.5 of 5 blocks strips 3
    # greedy picks in sequence, so a longer order from an earlier call on this model (a planner's memo) holds k's
    done = ctx.memo.get("mlp_strip_greedy", []) if ctx.memo is not None else []
    order = done[:k] if len(done) >= k else greedy_mlp_skip(model, adapter, ctx.calib, k)
    if ctx.memo is not None and len(order) > len(done):
        ctx.memo["mlp_strip_greedy"] = order
    scores = ", ".join(f"{s['block']} (KL {s['kl']:.4g})" for s in order)
    return [s["block"] for s in order], [f"auto: greedy skip-KL chose, in order, blocks {scores}"], {"scores": order}


@register_pass("mlp_strip", MLPStripConfig, families={"vit"},
               summary="remove the MLP branch of chosen blocks, or auto by skip-KL (approximate; the main latency lever)")
def mlp_strip(model, adapter, cfg: MLPStripConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    notes, extra = [], {}
    if cfg.blocks == "auto":
        idx, notes, extra = _auto(model, adapter, cfg, ctx)
        idx = sorted(idx)
    else:
        idx = select(cfg.blocks, len(blocks), "mlp_strip")
    already = [i for i in idx if blocks[i].mlp is None]
    removed = 0
    for i in idx:
        if blocks[i].mlp is not None:
            removed += sum(p.numel() for m in (blocks[i].norm2, blocks[i].mlp, blocks[i].ls2) for p in m.parameters())
            blocks[i].strip_mlp()
    done = [i for i in idx if i not in already]
    changes = notes + [f"stripped the MLP of blocks {done}: {removed:,} parameters removed"]
    if already:
        changes.append(f"blocks {already} had no MLP left; nothing to do there")
    return PassResult(model, changes, {"blocks": done, **extra})
