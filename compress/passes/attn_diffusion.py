"""Attention as one graph-diffusion step (Ravuri & Lawrence): the values see A - gamma*I per block.

gamma is a learnable scalar per block initialised at 0, so the pass is exact as applied;
distillation decides gamma, and the report lists what it learned. A change of inductive
bias, not a compressor (+1 parameter per block).
"""
from __future__ import annotations

from ..core.errors import InputError
from ..core.modules import Attention, DiffusedValue
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, select


class AttnDiffusionConfig(PassConfig):
    blocks: BlockSel = "all"
    gamma: float = 0.0  # the starting value; 0 keeps the model exactly

    def is_exact(self) -> bool:
        return self.gamma == 0.0


@register_pass("attn_diffusion", AttnDiffusionConfig, families={"vit"},
               summary="attention A - gamma*I with a learnable gamma per block (exact at gamma 0; distillation learns it)")
def attn_diffusion(model, adapter, cfg: AttnDiffusionConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    idx = select(cfg.blocks, len(blocks), "attn_diffusion")
    for i in idx:
        attn = blocks[i].attn
        if not isinstance(attn, Attention):
            raise InputError(f"attn_diffusion: block {i} has {type(attn).__name__} attention, which has no separate "
                             "value part; put attn_diffusion before crate in the recipe")
        if isinstance(attn.value, DiffusedValue):
            raise InputError(f"attn_diffusion: block {i} is already diffused; list attn_diffusion once")
    for i in idx:
        blocks[i].attn.value = DiffusedValue(blocks[i].attn.value, cfg.gamma)
    changes = [f"attention of blocks {idx} diffused (A - gamma*I), gamma starts at {cfg.gamma:g} and is learned: +{len(idx)} params"]
    return PassResult(model, changes, {"blocks": idx})
