"""Row/column tying (Koyun & Töreyin): one matrix W for both directions, FFN(x) = W^T F(W x + b1) + b2.

ViT MLPs keep W = fc1 and fit a per-hidden-unit scale s on calibration tokens (ReLU: s >= 0
folds into W and b1; otherwise s stays as m parameters). ResNet blocks tie the last conv to
the transpose of the first, with BatchNorm absorbing the fitted rescalings. Weights are
shared, computation is not: FLOPs do not fall.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.errors import InputError
from ..core.probe import capture
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._blocks import BlockSel, select
from ._tie_resnet import tie_resnet
from .tied import TiedMLP

NO_FLOPS = "FLOPs do not fall: tying shares weights, not computation (it buys file size, not latency)"


class TieRowColConfig(PassConfig):
    blocks: BlockSel = "all"  # ViT blocks, or ResNet blocks counted over layer1..layer4
    staged: bool = False  # ResNet: one W shared by all eligible blocks of a stage

    def is_exact(self) -> bool:
        return False

    def needs_data(self) -> str | None:
        return "it fits its scales on calibration activations"


def _mlp_inputs(model, mlps: dict[int, nn.Module], calib: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each MLP's input tokens on the calibration batch, flattened to (tokens, d)."""
    got = capture(model, list(mlps.values()), calib, inputs=True)
    return {i: x.reshape(-1, x.shape[-1]) for i, x in zip(mlps, got)}


def fit_scale(x: torch.Tensor, w1: torch.Tensor, b1, w2: torch.Tensor, b2, act: nn.Module, nonneg: bool):
    """Least squares s (and b2) with (s * F(W1 x + b1)) W1 + b2' ~ F(W1 x + b1) W2^T + b2 over tokens x.

    Normal equations of the m unknowns: G = (Hc^T Hc) * (W1 W1^T), g_i = sum_t Hc_ti <W1_i, Yc_t>
    (c: centred, so b2' absorbs the mean). nonneg: active set, fixing negative entries at zero.
    """
    x, w1, w2 = x.detach().double(), w1.detach().double(), w2.detach().double()
    h = act(x @ w1.T + (b1.detach().double() if b1 is not None else 0))
    y = h @ w2.T
    hc, yc = h - h.mean(0), y - y.mean(0)
    gram = (hc.T @ hc) * (w1 @ w1.T)
    g = (hc * (yc @ w1.T)).sum(0)
    gram = gram + (1e-8 * gram.diagonal().mean() + 1e-30) * torch.eye(len(g), dtype=gram.dtype)  # constant tokens: s = 0
    free = torch.ones(len(g), dtype=torch.bool)
    s = torch.zeros_like(g)
    for _ in range(20):
        s = torch.zeros_like(g)
        s[free] = torch.linalg.solve(gram[free][:, free], g[free])
        if not nonneg or (s >= 0).all():
            break
        free &= s > 0
    s = s.clamp_min(0) if nonneg else s
    new_b2 = y.mean(0) - (h.mean(0) * s) @ w1 + (b2.detach().double() if b2 is not None else 0)
    err = float(((hc * s) @ w1 - yc).norm() / yc.norm().clamp_min(1e-300))  # b2' makes the means agree
    return s, new_b2, err


def _tie_vit(model, adapter, cfg: TieRowColConfig, ctx: PassContext) -> PassResult:
    blocks = adapter.vit_blocks(model)
    idx = select(cfg.blocks, len(blocks), "tie_rowcol")
    skipped, mlps = {}, {}
    for i in idx:
        mlp = blocks[i].mlp
        if mlp is None or isinstance(mlp, TiedMLP):
            skipped[i] = "no MLP left" if mlp is None else "already tied"
        elif not (type(getattr(mlp, "fc1", None)) is nn.Linear and type(getattr(mlp, "fc2", None)) is nn.Linear
                  and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
            skipped[i] = f"MLP {type(mlp).__name__} is not fc1 -> act -> fc2 with plain Linear layers (factorised?)"
        else:
            mlps[i] = mlp
    if ctx.replay is not None:
        for i in map(int, ctx.replay["blocks"]):
            m, scaled = blocks[i].mlp, ctx.replay["scaled"][str(i)]
            blocks[i].mlp = TiedMLP(m.fc1.weight.detach().clone(), m.fc1.bias, m.fc2.bias, m.act,
                                    torch.ones(m.fc1.out_features) if scaled else None)
        return PassResult(model, [], ctx.replay)
    if not mlps:
        raise InputError(f"tie_rowcol: no MLP in blocks {idx} can be tied ({'; '.join(f'{i}: {w}' for i, w in skipped.items())})")
    inputs = _mlp_inputs(model, mlps, ctx.calib)
    details = {"blocks": list(mlps), "scaled": {}, "fit_error": {}, "skipped": {str(i): w for i, w in skipped.items()},
               "flops_change": "none"}
    changes, saved = [], 0
    with torch.no_grad():
        for i, mlp in mlps.items():
            fc1, fc2, act = mlp.fc1, mlp.fc2, mlp.act
            relu = type(act) is nn.ReLU
            s, b2, err = fit_scale(inputs[i], fc1.weight, fc1.bias, fc2.weight, fc2.bias, act, nonneg=relu)
            dt = fc1.weight.dtype
            if relu:  # s >= 0: W^T s relu(Wx + b) = (sqrt(s) W)^T relu(sqrt(s) W x + sqrt(s) b), exactly
                r = s.sqrt()
                new = TiedMLP((r[:, None] * fc1.weight.double()).to(dt),
                              None if fc1.bias is None else (r * fc1.bias.double()).to(dt), b2.to(dt), act)
            else:
                new = TiedMLP(fc1.weight.detach().clone(), None if fc1.bias is None else fc1.bias.detach().clone(),
                              b2.to(dt), act, s.to(dt))
            before = sum(p.numel() for p in mlp.parameters())
            saved += before - sum(p.numel() for p in new.parameters())
            blocks[i].mlp = new
            details["scaled"][str(i)] = not relu
            details["fit_error"][str(i)] = err
            changes.append(f"block {i}: fc2 := fc1^T with a fitted per-unit scale ({'folded into W, b1 (ReLU)' if relu else 'kept: m extra parameters'}), "
                           f"calibration fit error {100 * err:.1f}% of the MLP output")
    changes.insert(0, f"tied the MLPs of blocks {list(mlps)}: {saved:,} parameters removed; {NO_FLOPS}")
    changes += [f"block {i}: not tied, {w}" for i, w in skipped.items()]
    return PassResult(model, changes, details)


@register_pass("tie_rowcol", TieRowColConfig, families={"vit", "resnet"},
               summary="one matrix for both directions: fc2 = fc1^T (ViT), expand = reduce^T (ResNet); params only, FLOPs unchanged")
def tie_rowcol(model, adapter, cfg: TieRowColConfig, ctx: PassContext) -> PassResult:
    if adapter.family == "vit":
        if cfg.staged:
            raise InputError("tie_rowcol.staged shares W across a ResNet stage; ViT MLPs are tied block by block. Remove staged")
        return _tie_vit(model, adapter, cfg, ctx)
    return tie_resnet(model, adapter, cfg, ctx, NO_FLOPS)
