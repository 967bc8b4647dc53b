"""MLP stripping (Bermeitinger et al.): drop the MLP branch of chosen blocks.

The MLP holds about two thirds of a ViT block's parameters and FLOPs, so this is the
largest real latency lever. Approximate: fidelity is measured, then distillation recovers.
"""
from __future__ import annotations

from ..registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, select


class MLPStripConfig(PassConfig):
    blocks: BlockSel

    def is_exact(self) -> bool:
        return False


@register_pass("mlp_strip", MLPStripConfig, families={"vit"},
               summary="remove the MLP branch of chosen blocks (approximate; the main latency lever)")
def mlp_strip(model, adapter, cfg: MLPStripConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    idx = select(cfg.blocks, len(blocks), "mlp_strip")
    already = [i for i in idx if blocks[i].mlp is None]
    removed = 0
    for i in idx:
        if blocks[i].mlp is not None:
            removed += sum(p.numel() for m in (blocks[i].norm2, blocks[i].mlp, blocks[i].ls2) for p in m.parameters())
            blocks[i].strip_mlp()
    done = [i for i in idx if i not in already]
    changes = [f"stripped the MLP of blocks {done}: {removed:,} parameters removed"]
    if already:
        changes.append(f"blocks {already} had no MLP left; nothing to do there")
    return PassResult(model, changes, {"blocks": done})
