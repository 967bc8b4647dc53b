"""Low-rank projection: W -> U_r (U_r^T W), U_r the top-r principal directions of the outputs Y = W X.

That minimises the calibration output error at each rank (the error of whitened SVD, with no
Cholesky); `svd` takes U_r from the weight's own SVD instead (data-free basis, for comparison).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from ..adapters.base import set_module
from ..adapters.generic import structural_layers
from ..core.errors import InputError
from ..core.limits import release
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ..core.rsslog import mark
from ._lowrank_alloc import greedy as _allocate
from ._lowrank_alloc import uniform as _uniform
from ._scope import layer_share, whole_cost

Kind = Literal["attn", "mlp", "conv", "stem", "head"]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class LowRankConfig(PassConfig):
    method: Literal["whitened_svd", "svd"] = "whitened_svd"
    rank: Optional[Union[PositiveInt, Fraction]] = None  # every layer: an int, or a fraction of min(in, out)
    target: Optional[Fraction] = None  # fraction of the params/FLOPs to keep (of the selected layers', see scope)
    # `model`: target is a share of the whole model's cost (the rest stays as it is), so a planner asks for a model-level
    # budget in one rewrite instead of bisecting the layers' share (as width's scope)
    scope: Literal["layers", "model"] = "layers"
    budget: Literal["flops", "params"] = "flops"
    layers: list[Kind] = ["attn", "mlp", "conv"]
    multiple: PositiveInt = 8  # ranks are multiples of this (DESIGN §8: odd widths waste the FLOP gain)
    # how a target is spread over layers: `greedy` = least energy lost per unit of cost saved (may cut a few
    # layers deep); `uniform` = one rank fraction for every layer, the largest that meets the target;
    # `auto` = both, the one with the lower calibration KL to the unfactorised model wins (greedy lost by 6
    # points of top-1 on a ResNet at 50% in the benchmark, and won on the ViT)
    allocate: Literal["auto", "greedy", "uniform"] = "auto"

    @model_validator(mode="after")
    def _rank_or_target(self):
        if (self.rank is None) == (self.target is None):
            raise ValueError("give exactly one of rank (int or fraction) or target (fraction of params/FLOPs to keep)")
        return self

    def is_exact(self) -> bool:
        return False

    def needs_data(self) -> str | None:
        return ("method whitened_svd fits each factorisation to calibration activations (method: svd does not)"
                if self.method == "whitened_svd" else None)


def _shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of the layer's weight as a matrix: a conv is (C_out, C_in*k*k)."""
    w = layer.weight
    return w.shape[0], w[0].numel()


def factorised(layer: nn.Module, rank: int) -> nn.Sequential:
    """Two layers of the same kind: rank-r first factor (no bias), then the map back to the outputs (bias)."""
    bias, meta = layer.bias is not None, {"device": "meta"}  # no random init: every weight is written afterwards
    if isinstance(layer, nn.Linear):
        pair = nn.Sequential(nn.Linear(layer.in_features, rank, bias=False, **meta),
                             nn.Linear(rank, layer.out_features, bias=bias, **meta))
    else:
        first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                          bias=False, padding_mode=layer.padding_mode, **meta)
        pair = nn.Sequential(first, nn.Conv2d(rank, layer.out_channels, 1, bias=bias, **meta))
    return pair.to_empty(device=layer.weight.device)


def _input_side(layer: nn.Module) -> bool:
    """A Linear wider out than in (qkv, fc1) keeps its moments on the narrower input side: C = W M W^T."""
    return isinstance(layer, nn.Linear) and layer.in_features < layer.out_features


@torch.no_grad()
def _output_stats(model: nn.Module, layers: dict[str, nn.Module], calib: torch.Tensor) -> tuple[dict[str, tuple], torch.Tensor]:
    """Per layer: a second moment and positions per image.

    Mostly C = sum y y^T of the bias-free outputs; for a Linear with in < out, the input moment
    M = sum x x^T instead (C = W M W^T, the same information in in^2 instead of out^2 numbers).
    Float32 (one product per layer and forward: a float64 copy would only double what is held for every
    layer until its basis is made; `_basis` works in float64). Also returns the model's logits on `calib`.
    """
    stats, hooks = {}, []

    def hook(name):
        def fn(mod, inp, out):
            if _input_side(mod):
                y = inp[0]
            else:
                y = out.movedim(1, -1) if isinstance(mod, nn.Conv2d) else out  # channels last
                if mod.bias is not None:
                    y = y - mod.bias
            y = y.reshape(-1, y.shape[-1]).float()
            c, n = stats.get(name, (0, 0))
            stats[name] = (c + y.T @ y, n + y.shape[0])
        return fn

    for name, layer in layers.items():
        hooks.append(layer.register_forward_hook(hook(name)))
    try:
        out = model(calib)
    finally:
        for h in hooks:
            h.remove()
    return {k: (c, n // len(calib)) for k, (c, n) in stats.items()}, out


def _lost(u: torch.Tensor, cov: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of the output energy tr(C) that projecting on u[:, :r] loses, for r = 1..k.

    With `w`, `cov` is an input moment M and C = W M W^T (never formed).
    """
    g = u if w is None else w.T @ u
    kept = torch.cumsum(((g.T @ cov) * g.T).sum(1), 0)
    total = float(cov.trace()) if w is None else float(((w @ cov) * w).sum())
    return (1 - kept / total).clamp_min(0) if total > 0 else torch.zeros_like(kept)


def _basis(layer: nn.Module, cov: torch.Tensor, samples: int, method: str,
           k: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """An orthonormal output basis U (out x k); energy lost per rank under the shrunk and the raw calibration moments.

    With few output samples (a ResNet's last stage sees 2x2 positions per image at 64 px) the raw
    moment is rank-deficient and promises zero error at tiny ranks. Shrink it towards the
    white-input moment W W^T with a prior worth `out` samples (an inverse-Wishart posterior
    mean): the basis and the budget use that; the ledger reports the raw calibration error.
    Only the first k directions are kept (no candidate rank is larger). The basis is {"u": U}, or for a
    whitened layer wider out than in {"rv": V} with U = W V (see _input_basis).
    """
    side = _input_side(layer)  # then cov is the input moment M: C = W M W^T
    if method == "whitened_svd" and not side:
        # float32: ViT-L's fc2 keeps the same top-k energy to 2e-7 of float64's, in half the time
        wf, c32 = layer.weight.detach().float().flatten(1), cov.float()
        a = wf.shape[0] / (wf.shape[0] + samples)
        wwt = wf @ wf.T
        prior = wwt * (float(c32.trace()) / max(float(wwt.trace()), 1e-30))
        used = (1 - a) * c32 + a * prior
        # 1024x1024 in 0.055 s on the idle 2-core box (float64: 0.10 s; ViT-L has 120 of them). On a busy box
        # two threads can collapse (768x768 float64: 2.6 s while another process held a core)
        lam, vec = torch.linalg.eigh(used)
        u, energy, total = vec.flip(-1)[:, :k].double(), lam.flip(0)[:k].double(), float(used.double().trace())
        # under the moment the basis diagonalises, the energy kept per direction is its eigenvalue: no product needed
        shrunk = (1 - torch.cumsum(energy, 0) / total).clamp_min(0) if total > 0 else torch.zeros_like(energy)
        return {"u": u}, shrunk, _lost(u, cov.double(), None)
    w, cov = layer.weight.detach().double().flatten(1), cov.double()
    if method == "whitened_svd":
        return _input_basis(w, cov, samples, k)
    u = torch.linalg.svd(w, full_matrices=False)[0][:, :k]
    lost = _lost(u, cov, w if side else None)
    return {"u": u}, lost, lost


def _input_basis(w: torch.Tensor, m: torch.Tensor, samples: int, k: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Whitened basis of a Linear wider out than in (fc1, qkv), from its input moment M, all through the small
    G = W^T W (in x in): the output moment is C = W M' W^T with M' = (1-a) M + a s I (shrunk), and its top
    eigenvectors are the left singular vectors of B = W R for any root M' = R R^T (the Cholesky factor; the
    symmetric root if M' is singular). With B^T B = R^T G R = V S^2 V^T, U = W (R V / S): kept as V' = R V / S
    (in x k, a quarter of U for a 4x fc1) and rebuilt as W V' where it is used. Every trace and projection is
    an in x in product: ViT-L's fc1 took 28 G multiply-adds in float64 through W, and takes 12.
    """
    g = w.T @ w
    a = w.shape[0] / (w.shape[0] + samples)
    raw_total = float((m * g).sum())  # tr(W M W^T)
    used = (1 - a) * m + a * (raw_total / max(float(g.trace()), 1e-300)) * torch.eye(len(m), dtype=m.dtype)
    root, info = torch.linalg.cholesky_ex(used)
    if int(info) != 0:
        lam, q = torch.linalg.eigh(used)
        root = q * lam.clamp_min(0).sqrt()
    s2, v = torch.linalg.eigh(root.T @ g @ root)
    s2, v = s2.flip(0)[:k].clamp_min(0), v.flip(-1)[:, :k]
    rv = (root @ v) / s2.clamp_min(1e-300).sqrt()
    total = float((used * g).sum())
    shrunk = (1 - torch.cumsum(s2, 0) / total).clamp_min(0) if total > 0 else torch.zeros_like(s2)
    gu = g @ rv  # W^T U
    kept = torch.cumsum(((gu.T @ m) * gu.T).sum(1), 0)
    raw = (1 - kept / raw_total).clamp_min(0) if raw_total > 0 else torch.zeros_like(kept)
    return {"rv": rv}, shrunk, raw


def _cols(c: dict, layer: nn.Module, rank: int) -> torch.Tensor:
    """The first `rank` output basis vectors of a layer's candidate (out x rank, float32)."""
    if "rv" in c:
        return layer.weight.detach().float().flatten(1) @ c["rv"][:, :rank]
    return c["u"][:, :rank]


def _replace(model, name: str, layer: nn.Module, u: torch.Tensor | None, rank: int) -> nn.Sequential:
    new = factorised(layer, rank).to(layer.weight.dtype)
    if u is not None:  # in the weights' precision: u is float32, and the factor error is far above its rounding
        ur = u[:, :rank].to(layer.weight.dtype)
        w = layer.weight.detach()
        with torch.no_grad():
            new[0].weight.copy_((ur.T @ w.flatten(1)).view_as(new[0].weight))
            new[1].weight.copy_(ur.view_as(new[1].weight))
            if layer.bias is not None:
                new[1].bias.copy_(layer.bias)
    set_module(model, name, new)
    return new


def _layer_target(model, cfg: LowRankConfig, total: float, size: tuple) -> float:
    """The selected layers' share that leaves the model at cfg.target of its cost (scope: model), else cfg.target."""
    if cfg.scope == "layers":
        return cfg.target
    whole = whole_cost(model, cfg.budget, size)
    target = layer_share(cfg.target, whole, total)
    if target <= 0:
        raise InputError(f"lowrank: target {cfg.target} of the model's {cfg.budget} is out of reach: the layers it may "
                         f"factorise are {total / whole:.0%} of them; raise target or select more layer kinds")
    return target


@torch.no_grad()
def _better_allocation(model, layers: dict, cands: dict, cfg: LowRankConfig, target: float, total: float, calib,
                       ref) -> tuple:
    """allocate: auto. Each allocation tried in place (factorised layers swapped in, then the originals back:
    no copy of the model); the lower calibration KL to `ref`, the model's logits, wins (greedy on a tie)."""
    ref = ref.double().log_softmax(-1)
    kls, picks, outs = {}, {}, {}
    for name, fn in (("greedy", _allocate), ("uniform", _uniform)):
        picks[name] = fn(cands, target, total, cfg.budget)
        try:
            for n, r in picks[name].items():
                _replace(model, n, layers[n], _cols(cands[n], layers[n], r), r)
            outs[name] = model(calib)
        finally:
            for n in picks[name]:
                set_module(model, n, layers[n])
        mark(f"lowrank: {name} trial")
        out = outs[name].double().log_softmax(-1)
        kls[name] = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))
    best = min(kls, key=lambda k: (kls[k], k != "greedy"))
    return best, picks[best], kls, outs[best]  # the winner's logits: the same layers are built again below


def _prepare(model, chosen: dict, layers: dict, cfg: LowRankConfig, calib) -> tuple:
    """Per layer: the cost weight, the basis and error curve over ranks; the model's logits; layers left out and why.
    Depends on the model, calib and cfg's method/multiple/budget/layers/rank only (not the target): a planner trying
    several targets on one model keeps it in PassContext.memo."""
    skipped = {}
    stats, ref = _output_stats(model, chosen, calib)
    mark("lowrank: statistics forward")
    weight = {n: (stats[n][1] if cfg.budget == "flops" else 1) for n in chosen}  # FLOPs scale with positions
    full = {n: min(_shape(m)) for n, m in layers.items()}
    if isinstance(cfg.rank, int) and full and cfg.rank > max(full.values()):
        raise InputError(f"lowrank.rank {cfg.rank} is larger than every selected layer's matrix (the largest has full "
                         f"rank {max(full.values())}); give a smaller rank or a fraction such as 0.25")
    cands = {}
    for n, m in layers.items():
        out, inn = _shape(m)
        even = out * inn / (out + inn)
        top = full[n]
        if isinstance(cfg.rank, int) and cfg.rank > top:
            skipped[n] = f"rank {cfg.rank} exceeds this layer's full rank {top} ({out}x{inn})"
            continue
        if cfg.rank is not None:
            r = cfg.rank if isinstance(cfg.rank, int) else max(cfg.multiple, round(cfg.rank * top / cfg.multiple) * cfg.multiple)
            ranks = [min(r, top)]  # a fraction rounded up to `multiple` may pass a tiny layer's full rank
        else:
            ranks = list(range(cfg.multiple * (top // cfg.multiple), 0, -cfg.multiple))
        ranks = [r for r in ranks if r < even]
        if not ranks:
            skipped[n] = (f"rank {min(r, top)} would not save: break-even is {even:.1f} = in*out/(in+out)" if cfg.rank
                          is not None else f"break-even rank {even:.1f} is below the smallest rank {cfg.multiple}")
            continue
        basis, lost, raw = _basis(m, stats[n][0], stats[n][1] * len(calib), cfg.method, max(ranks))
        stats[n] = (None, stats[n][1])  # the moment is done with; a float32 basis is exact enough for float32 factors
        steps = [(None, 0.0, weight[n] * out * inn)] + [(r, float(lost[r - 1]), weight[n] * r * (out + inn)) for r in ranks]
        cands[n] = {**{key: b.float() for key, b in basis.items()}, "lost": raw, "steps": steps, "shape": (out, inn),
                    "even": even, "top": top}
    del stats
    release()  # the moments (ViT-L: 144 of 4 MB) stay in glibc's heap otherwise, under the factors built next
    mark("lowrank: bases")
    return weight, cands, ref, skipped


@register_pass("lowrank", LowRankConfig, families={"vit", "resnet", "other"}, input_logits=True,
               summary="factorise Linear/conv layers at ranks fitted to the outputs' principal directions (approximate)")
def lowrank(model, adapter, cfg: LowRankConfig, ctx: PassContext) -> PassResult:
    listed = adapter.layers(model)  # converts the family's blocks first, so the names resolve
    if ctx.replay is not None:  # rebuild the recorded structure; weights are loaded afterwards
        for name, info in ctx.replay["layers"].items():
            _replace(model, name, model.get_submodule(name), None, info["rank"])
        return PassResult(model, [], ctx.replay)
    # the family's names first, then every other plain layer the forward calls, found by structure (a hybrid ViT's
    # ResNet stem, a squeeze-excite's convs, a model no family knows): lowrank is layer-level, for any model
    known = {n for n, _ in listed}
    listed = listed + [(n, k) for n, k in structural_layers(model, ctx.calib[:1]) if n not in known]
    chosen = {n: model.get_submodule(n) for n, kind in listed if kind in cfg.layers}
    kinds = {n: kind for n, kind in listed}
    if not chosen:
        have = sorted({k for _, k in listed})
        raise InputError(f"lowrank: this model has no plain layers of kinds {cfg.layers}; it has {have}. "
                         "Choose layers from those")
    skipped = {n: "grouped conv: the factorisation is per group, not supported" for n, m in chosen.items()
               if getattr(m, "groups", 1) != 1}
    layers = {n: m for n, m in chosen.items() if n not in skipped}
    key = ("lowrank", cfg.method, cfg.multiple, cfg.budget, tuple(cfg.layers), cfg.rank)
    prepared = ctx.memo.get(key) if ctx.memo is not None else None
    if prepared is None:
        prepared = _prepare(model, chosen, layers, cfg, ctx.calib)
        if ctx.memo is not None:
            ctx.memo[key] = prepared
    weight, cands, ref, unfit = prepared
    skipped.update(unfit)
    allocate, compared, seen = cfg.allocate, None, None  # seen: the winner's logits from the allocation trial
    if cfg.target is not None:
        total = sum(weight[n] * _shape(m)[0] * _shape(m)[1] for n, m in chosen.items())
        target = _layer_target(model, cfg, total, tuple(ctx.calib.shape[1:]))
        if allocate == "auto":
            allocate, ranks, compared, seen = _better_allocation(model, layers, cands, cfg, target, total, ctx.calib, ref)
        else:
            ranks = (_uniform if allocate == "uniform" else _allocate)(cands, target, total, cfg.budget)
        for n in cands:
            if n not in ranks:
                skipped[n] = ("kept whole: the uniform rank fraction is at or above its break-even"
                              if allocate == "uniform" else "kept whole: the budget was met without it")
    else:
        ranks = {n: c["steps"][1][0] for n, c in cands.items()}
    details = {"method": cfg.method, "layers": {}, "skipped": skipped}
    if cfg.target is not None:
        details["allocate"] = allocate
    if compared is not None:
        details["allocate_kl"] = compared
    changes, selected = [], len(chosen)  # counted now: the loop below empties `chosen` as it goes
    with torch.no_grad():
        for n, r in ranks.items():  # each original dropped as it is replaced: no second copy of those layers' weights
            c, m = cands[n], layers.pop(n)
            chosen.pop(n)
            out, inn = c["shape"]
            p0 = sum(p.numel() for p in m.parameters())
            new = _replace(model, n, m, _cols(c, m, r), r)
            p1 = sum(p.numel() for p in new.parameters())
            err = float(c["lost"][r - 1]) ** 0.5
            details["layers"][n] = {"kind": kinds[n], "shape": [out, inn], "rank": r, "break_even": round(c["even"], 1),
                                    "rel_error": err, "params": [p0, p1]}
            changes.append(f"{n} ({kinds[n]}, {out}x{inn}): rank {r} (break-even {c['even']:.0f}), "
                           f"params {p0:,} -> {p1:,}, calibration output error {100 * err:.2f}%")
    p0 = sum(v["params"][0] for v in details["layers"].values())
    p1 = sum(v["params"][1] for v in details["layers"].values())
    how = f"{cfg.method}, {allocate} allocation" if cfg.target is not None else cfg.method
    if compared is not None:
        how += " (auto: calibration KL " + ", ".join(f"{k} {v:.4g}" for k, v in compared.items()) + ")"
    head = f"factorised {len(ranks)} of {selected} selected layers ({how}): their params {p0:,} -> {p1:,}"
    return PassResult(model, [head, *changes, *(f"{n}: not factorised, {why}" for n, why in skipped.items())], details,
                      logits=seen, input_logits=ref)
