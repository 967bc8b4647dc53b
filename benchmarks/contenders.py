"""Benchmark contenders as recipes, so every one runs through the same pipeline and measurements.

Two bench-only passes make the outside baselines recipes too: `bench_torch_pruning`
(Torch-Pruning structural pruning to a FLOP budget) and `bench_reinit` (random init of
whatever structure the passes before it built: the from-scratch bar).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from compress.core.errors import InputError
from compress.measure.metrics import count_flops
from compress.core.registry import PassConfig, PassContext, PassResult, all_passes, register_pass


class TorchPruningConfig(PassConfig):
    flops_ratio: float  # prune until FLOPs <= this share of the input model's
    importance: Literal["l2", "l1"] = "l2"  # Torch-Pruning's GroupMagnitudeImportance(p)
    round_to: Optional[int] = None  # as in Torch-Pruning's timm ViT example (no rounding)
    search_steps: int = 8  # bisection steps on the (uniform) channel pruning ratio

    def is_exact(self) -> bool:
        return False


def _vit_attention(model: nn.Module) -> list[nn.Module]:
    from timm.layers import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


@register_pass("bench_torch_pruning", TorchPruningConfig, families={"vit", "resnet"},
               summary="benchmark only: Torch-Pruning magnitude pruning to a FLOP budget")
def torch_pruning(model, adapter, cfg: TorchPruningConfig, ctx: PassContext) -> PassResult:
    """Torch-Pruning's documented recipe: a BasePruner with group magnitude importance, the
    classifier ignored, and for timm ViTs the qkv heads declared (head dims pruned, heads kept)
    and num_heads / head_dim / attn_dim set from the pruner afterwards (examples/transformers).
    The uniform pruning ratio is bisected on fresh copies until FLOPs meet the budget."""
    import copy

    example = ctx.calib[:1] if ctx.calib is not None else torch.randn(1, *adapter.input_size(model))
    size = tuple(example.shape[1:])
    base = count_flops(model, size)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(cfg.search_steps):  # bisect the uniform channel ratio for the largest FLOPs within budget
        mid = (lo + hi) / 2
        pruned = _prune(copy.deepcopy(model), example, mid, cfg)
        flops = count_flops(pruned, size)
        if flops <= cfg.flops_ratio * base * 1.02:
            best, hi = (pruned, flops, mid), mid
        else:
            lo = mid
    if best is None:
        raise InputError(f"bench_torch_pruning: cannot reach {cfg.flops_ratio:.0%} of the FLOPs by pruning 95% of the channels")
    model, flops, ratio = best
    widths = sorted({m.out_features if isinstance(m, nn.Linear) else m.out_channels
                     for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
    return PassResult(model, [f"Torch-Pruning ({cfg.importance} magnitude), channel ratio {ratio:.3f}: FLOPs "
                              f"{base:,} -> {flops:,} ({flops / base:.1%})"],
                      {"pruning_ratio": ratio, "flops_ratio": flops / base, "widths": widths})


def _prune(model: nn.Module, example: torch.Tensor, ratio: float, cfg) -> nn.Module:
    import torch_pruning as tp

    attns = _vit_attention(model)
    pruner = tp.pruner.BasePruner(
        model, example, importance=tp.importance.GroupMagnitudeImportance(p=2 if cfg.importance == "l2" else 1),
        pruning_ratio=ratio, ignored_layers=[model.get_classifier()],
        num_heads={a.qkv: a.num_heads for a in attns}, prune_head_dims=True, prune_num_heads=False,
        round_to=cfg.round_to)
    pruner.step()
    for a in attns:  # timm's Attention reads these in forward
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
    return model.eval()


class TokenKeepConfig(PassConfig):
    flops_ratio: float  # keep the most leading tokens whose FLOPs are at most this share of the input model's

    def is_exact(self) -> bool:
        return False


class _KeepFirst:
    """A forward pre-hook on the blocks: their input cut to its first n tokens (traced into the ONNX file)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, module, args):
        return (args[0][:, :self.n], *args[1:])


@register_pass("bench_token_keep", TokenKeepConfig, families={"vit"},
               summary="benchmark only: the first N tokens kept before the blocks, N for a FLOP share (token_merge's "
                       "hand-built reference: the same network on fewer tokens)")
def token_keep(model, adapter, cfg: TokenKeepConfig, ctx: PassContext) -> PassResult:
    """The reference token_merge is judged against: every block runs on a fixed smaller token count from the
    start, with no merging work at all. Needs the blocks in one `blocks` container (timm)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise InputError("bench_token_keep: needs a timm-style model whose blocks run as one nn.Sequential `blocks`")
    size = adapter.input_size(model)
    tokens = int(adapter.describe(model)["tokens"])
    base = count_flops(model, size)
    hook = None
    lo, hi = 1, tokens  # the largest n whose FLOPs fit: bisection (FLOPs grow with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        hook = blocks.register_forward_pre_hook(_KeepFirst(mid))
        fits = count_flops(model, size) <= cfg.flops_ratio * base
        hook.remove()
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    blocks.register_forward_pre_hook(_KeepFirst(lo))
    flops = count_flops(model, size)
    return PassResult(model, [f"the blocks run on the first {lo} of {tokens} tokens: FLOPs {base:,} -> {flops:,} "
                              f"({flops / base:.1%})"], {"tokens": lo, "of": tokens, "flops_ratio": flops / base})


class ReinitConfig(PassConfig):
    seed: int = 0

    def is_exact(self) -> bool:
        return False


@register_pass("bench_reinit", ReinitConfig, families={"vit", "resnet"},
               summary="benchmark only: random init of the current structure (the from-scratch bar)")
def reinit(model, adapter, cfg: ReinitConfig, ctx: PassContext) -> PassResult:
    """PyTorch's default init for every layer that has one; other tensors (position embedding,
    class token) get timm's trunc-normal(0.02). 1-d scales without a layer keep their value."""
    torch.manual_seed(cfg.seed)
    done = set()
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
            done.update(id(p) for p in m.parameters(recurse=False))
    left = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            if id(p) not in done and p.dim() >= 2:
                nn.init.trunc_normal_(p, std=0.02)
                left += 1
    n = sum(1 for _ in model.parameters())
    return PassResult(model, [f"re-initialised all {n} parameter tensors at random (seed {cfg.seed})"],
                      {"seed": cfg.seed, "other_tensors": left})


def has_lowrank() -> bool:
    return "lowrank" in all_passes()
