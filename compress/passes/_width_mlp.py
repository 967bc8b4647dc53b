"""width on a model no family knows: its MLPs found by structure, narrowed, their consumer refit.

An MLP is a module with 2-3 plain Linear children where the last one called (the consumer) reads h hidden units
that the others (the producers) write: one producer of h (Linear -> act -> Linear), two of h (gated, SwiGLU:
act(x Wg) * x Wx), or one of 2h (timm GluMlp: the halves chunked). That units are independent (only elementwise
ops between producers and consumer, no norm over the hidden units) is not assumed: it is checked on the MLP's real
input (keeping a random half of the units must equal zeroing the consumer's other columns), so a structure that
only looks like an MLP is left alone.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..adapters.base import heads_of, set_module
from ..adapters.generic import _ATTN, _block_lists
from ..core.errors import InputError
from ..core.modules import ViTBlock
from ..core.registry import PassResult
from ._scope import whole_cost

CHECK_TOL = 1e-5  # of the output scale: the independence check is exact maths in float64


@dataclass
class Pair:
    name: str  # the MLP module
    producers: list[str]  # child names of the Linears that write the hidden units
    consumer: str  # child name of the Linear that reads them
    hidden: int
    fused: bool  # one producer writing both halves (value, gate) of 2 * hidden


def _candidates(model: nn.Module) -> list[Pair]:
    inside = [n for n, _ in _block_lists(model)]
    out = []
    for name, m in model.named_modules():
        if not name or not any(name.startswith(b + ".") for b in inside) or isinstance(m, ViTBlock):
            continue
        if _ATTN.search(name) or heads_of(m):
            continue
        lin = [(n, c) for n, c in m.named_children() if type(c) is nn.Linear]
        if len(lin) not in (2, 3):
            continue
        cons_name, cons = lin[-1]  # registration order; the check below catches a module that calls them otherwise
        h, prods = cons.in_features, lin[:-1]
        widths = {c.out_features for _, c in prods}
        fused = len(prods) == 1 and widths == {2 * h}
        if not fused and widths != {h} or len({c.in_features for _, c in prods}) != 1:
            continue
        out.append(Pair(name, [n for n, _ in prods], cons_name, h, fused))
    return out


def _rows(pair: Pair, keep: torch.Tensor) -> torch.Tensor:
    return torch.cat([keep, keep + pair.hidden]) if pair.fused else keep


def _narrowed(mlp: nn.Module, pair: Pair, keep: torch.Tensor, weight: torch.Tensor, bias) -> nn.Module:
    """A copy of `mlp` keeping `keep` hidden units, its consumer given `weight` (out x k) and `bias`."""
    new = copy.deepcopy(mlp)
    for p in pair.producers:
        src = getattr(mlp, p)
        rows = _rows(pair, keep)
        lin = nn.Linear(src.in_features, len(rows), bias=src.bias is not None).to(src.weight)
        with torch.no_grad():
            lin.weight.copy_(src.weight[rows])
            if src.bias is not None:
                lin.bias.copy_(src.bias[rows])
        setattr(new, p, lin)
    cons = getattr(mlp, pair.consumer)
    lin = nn.Linear(len(keep), cons.out_features, bias=bias is not None).to(cons.weight)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    setattr(new, pair.consumer, lin)
    return new


def _inputs(model: nn.Module, pairs: list[Pair], calib: torch.Tensor) -> dict[str, tuple]:
    """Per MLP: its input (args, kwargs) and its consumer's input (the hidden units), on the calibration batch."""
    got, hooks = {}, []
    for p in pairs:
        mlp = model.get_submodule(p.name)
        hooks.append(mlp.register_forward_pre_hook(
            lambda m, a, k, n=p.name: got.setdefault(n, {}).update(args=a, kwargs=k), with_kwargs=True))
        hooks.append(getattr(mlp, p.consumer).register_forward_pre_hook(
            lambda m, a, n=p.name: got.setdefault(n, {}).update(hidden=a[0])))
    try:
        with torch.no_grad():
            model(calib)
    finally:
        for h in hooks:
            h.remove()
    return got


def _independent(mlp: nn.Module, pair: Pair, seen: dict) -> bool:
    """Keeping a random half of the units equals zeroing the consumer's other columns (float64, exact maths)."""
    m64 = copy.deepcopy(mlp).double().eval()
    args = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in seen["args"]]
    keep = torch.randperm(pair.hidden, generator=torch.Generator().manual_seed(0))[: max(1, pair.hidden // 2)].sort().values
    cons = getattr(m64, pair.consumer)
    try:
        with torch.no_grad():
            small = _narrowed(m64, pair, keep, cons.weight[:, keep], cons.bias)(*args, **seen["kwargs"])
            cons.weight[:, [j for j in range(pair.hidden) if j not in set(keep.tolist())]] = 0
            full = m64(*args, **seen["kwargs"])
    except Exception:  # noqa: BLE001 - a module that cannot run narrowed is not an MLP pair
        return False
    if not torch.is_tensor(full) or full.shape != small.shape:
        return False
    return float((full - small).abs().max()) <= CHECK_TOL * max(float(full.abs().max()), 1e-12)


def find_pairs(model: nn.Module, calib: torch.Tensor) -> tuple[list[Pair], dict]:
    """The MLP pairs that pass the independence check, with their captured inputs."""
    pairs = _candidates(model)
    seen = _inputs(model, pairs, calib[:4]) if pairs else {}
    ok = [p for p in pairs if p.name in seen and "hidden" in seen[p.name]
          and _independent(model.get_submodule(p.name), p, seen[p.name])]
    return ok, seen


def _refit(h: torch.Tensor, cons: nn.Linear, keep: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares: the kept units (and a constant) reproduce the consumer's output on all units."""
    x = h.reshape(-1, h.shape[-1]).double()
    w = cons.weight.detach().double()
    y = x @ w.T
    xs = torch.cat([x[:, keep], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    g = xs.T @ xs
    lam = ridge * float(torch.diagonal(g)[:-1].mean())
    reg = torch.eye(len(g), dtype=g.dtype) * lam
    reg[-1, -1] = 0
    beta = torch.linalg.solve(g + reg, xs.T @ y)  # (k + 1) x out; the sliced weight is what ridge pulls towards below
    sliced = torch.cat([w[:, keep].T, torch.zeros(1, w.shape[0], dtype=w.dtype)])
    beta = beta + torch.linalg.solve(g + reg, reg @ sliced)
    bias = beta[-1] + (cons.bias.detach().double() if cons.bias is not None else 0)
    return beta[:-1].T.to(cons.weight.dtype), bias.to(cons.weight.dtype)


def mlp_width(model: nn.Module, adapter, cfg, ctx) -> PassResult:
    """width for the generic adapter: the MLPs' hidden units, one kept fraction for all (uniform)."""
    if ctx.replay is not None:
        for name, info in ctx.replay["mlps"].items():
            p = Pair(**{k: v for k, v in info.items() if k in Pair.__dataclass_fields__})
            mlp, k = model.get_submodule(name), info["width"][1]
            cons = getattr(mlp, p.consumer)
            set_module(model, name, _narrowed(mlp, p, torch.arange(k), cons.weight[:, :k], cons.bias))
        return PassResult(model, [], ctx.replay)
    if "mlp" not in cfg.layers:
        raise InputError(f"width: on this {type(model).__name__} (no known family) only MLP widths are found by "
                         "structure; add mlp to width.layers, or use lowrank")
    pairs, seen = find_pairs(model, ctx.calib)
    if not pairs:
        raise InputError(f"width: no MLP (Linear -> activation -> Linear, or gated) found by structure in this "
                         f"{type(model).__name__}'s repeated blocks; lowrank applies to any model")
    n = len(ctx.calib[:4])
    unit = {}  # cost of one hidden unit per image: its producer rows and consumer column over the tokens
    for p in pairs:
        mlp = model.get_submodule(p.name)
        cons, d = getattr(mlp, p.consumer), getattr(mlp, p.producers[0]).in_features
        tokens = seen[p.name]["hidden"].numel() // p.hidden // n if cfg.budget == "flops" else 1
        per = len(p.producers) * (d + 1) * (2 if p.fused else 1) + cons.out_features
        unit[p.name] = tokens * per
    size = tuple(ctx.calib.shape[1:])
    whole = whole_cost(model, cfg.budget, size)
    variable = sum(unit[p.name] * p.hidden for p in pairs)
    if cfg.keep is not None:
        frac = cfg.keep
    elif cfg.scope == "model":
        frac = 1 - (1 - cfg.target) * whole / variable
    else:
        frac = cfg.target
    widths = {p.name: p.hidden if frac >= 1 else int(round(frac * p.hidden / cfg.multiple)) * cfg.multiple for p in pairs}
    if any(w < cfg.multiple for w in widths.values()) and cfg.keep is None:
        least = sum(unit[p.name] * cfg.multiple for p in pairs) + whole - variable
        raise InputError(f"width: target {cfg.target} is out of reach: the MLPs found by structure are {variable / whole:.0%} "
                         f"of the model's {cfg.budget}; at the smallest widths it keeps {least / whole:.0%}; raise target "
                         "or use lowrank (any layer)")
    details, changes = {"allocate": "uniform", "budget": cfg.budget, "mlps": {}}, []
    calib = ctx.calib
    for p in pairs:
        mlp, k = model.get_submodule(p.name), min(max(cfg.multiple, widths[p.name]), p.hidden)
        cons = getattr(mlp, p.consumer)
        h = _inputs(model, [p], calib)[p.name]["hidden"]  # the input as the MLPs before it left it
        score = h.reshape(-1, p.hidden).double().pow(2).mean(0) * cons.weight.detach().double().pow(2).sum(0)
        keep = score.topk(k).indices.sort().values
        if k < p.hidden and cfg.refit:
            weight, bias = _refit(h, cons, keep, cfg.ridge)
        else:  # every unit kept: the same layers, so exact
            weight, bias = cons.weight.detach()[:, keep], (cons.bias.detach() if cons.bias is not None else None)
        set_module(model, p.name, _narrowed(mlp, p, keep, weight, bias))
        details["mlps"][p.name] = {**asdict(p), "kind": "mlp", "width": [p.hidden, k]}
        changes.append(f"{p.name} (mlp{', gated' if len(p.producers) > 1 or p.fused else ''}): width {k}/{p.hidden}")
    head = (f"width (structural MLPs of a {type(model).__name__}, uniform, {'refit' if cfg.refit else 'no refit'}): "
            f"{len(pairs)} MLPs")
    return PassResult(model, [head, *changes], details)
