"""Width projection: narrower dense layers that onnxruntime runs at full speed (DESIGN §9).

Keeps k of m hidden units / channels (a coordinate subspace, chosen by optimal-brain-surgeon cost) or,
inside attention heads, the best r-dim subspace of each head's Q/K and V (folded into narrower q, k, v),
and refits each consumer by ridge least squares to the teacher's outputs on calibration data. The
result is a plain model: smaller Linear/Conv2d/BatchNorm, no masks, widths multiples of `multiple`.
"""
from __future__ import annotations

import copy
from typing import Annotated, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from ..adapters.base import heads_of
from ..adapters.user import unmapped_text
from ..core.errors import InputError
from ..core.modules import SeparateQK, SeparateVO
from ..core.probe import capture, kl
from ..core.registry import PassConfig, PassContext, PassResult, register_pass
from ._scope import layer_share, whole_cost
from ._width_groups import Group, Link, QKCut, SelectCut, Stream, StreamCut, VOCut, refit_reader
from ._width_graph import graph_replay, graph_width
from ._width_mlp import mlp_width

Kind = Literal["mlp", "qk", "vo", "conv", "residual"]
Fraction = Annotated[float, Field(gt=0, le=1)]


class WidthConfig(PassConfig):
    target: Optional[Annotated[float, Field(gt=0, lt=1)]] = None  # fraction of the cost to keep (see scope)
    scope: Literal["layers", "model"] = "layers"  # target counts the selected layers' cost, or the whole model's
    keep: Optional[Fraction] = None  # or: this fraction of every width (rounded down to `multiple`)
    budget: Literal["flops", "params"] = "flops"
    layers: list[Kind] = ["mlp", "qk", "vo", "conv"]
    multiple: PositiveInt = 8  # widths are multiples of this (DESIGN §8)
    # how a target is spread: `uniform` = one fraction for every width, topped up to the target; `greedy` = least
    # calibration error per unit of cost saved; `auto` = both, the lower calibration KL wins. Uniform is the default:
    # greedy's error curves are fitted on the calibration images and overfit them (shared ResNet at 50%, KL on
    # held-out images: greedy 0.70, uniform 0.10), and on the ViT uniform had the lower calibration KL too
    allocate: Literal["auto", "uniform", "greedy"] = "uniform"
    refit: bool = True  # least-squares refit of each consumer (false: the same selection, only sliced)
    ridge: float = Field(0.03, ge=0)  # pull of the refit towards the sliced weights, relative to the feature energy

    @model_validator(mode="after")
    def _target_or_keep(self):
        if (self.target is None) == (self.keep is None):
            raise ValueError("give exactly one of target (fraction of the cost to keep) or keep (fraction of each width)")
        return self

    def is_exact(self) -> bool:
        return False

    def needs_data(self) -> str | None:
        return "it ranks channels and refits their consumers on calibration activations"


# ------------------------------------------------------------------ where the widths are
def _chain(model, adapter) -> tuple[list[nn.Module], list[str]]:
    blocks = adapter.vit_blocks(model) if adapter.family == "vit" else adapter.res_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    return blocks, [names[id(b)] for b in blocks]


def _vit_groups(blocks, names, tokens: int, cfg) -> list[tuple[Group, object]]:
    t, out = tokens, []
    for i, (blk, name) in enumerate(zip(blocks, names)):
        s, v, mlp = blk.attn.score, blk.attn.value, blk.mlp
        if isinstance(s, SeparateQK):
            d, hd = s.q.in_features, s.heads
            g = Group(f"{name}.attn.score", "qk", i, s.q.out_features // hd, hd, hd * (2 * t * d + t * t), 2 * hd * (d + 1))
            out.append((g, QKCut(g, cfg.multiple, cfg.ridge, cfg.refit)))
        if isinstance(v, SeparateVO):
            d, hd, do = v.v.in_features, v.heads, v.proj.out_features
            g = Group(f"{name}.attn.value", "vo", i, v.v.out_features // hd, hd, hd * (t * d + t * t + t * do),
                      hd * (d + 1 + do))
            out.append((g, VOCut(g, cfg.multiple, cfg.ridge, cfg.refit)))
        if (mlp is not None and type(getattr(mlp, "fc1", None)) is nn.Linear and type(getattr(mlp, "fc2", None)) is nn.Linear
                and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)):
            d, do = mlp.fc1.in_features, mlp.fc2.out_features
            g = Group(f"{name}.mlp", "mlp", i, mlp.fc1.out_features, 1, t * (d + do), d + 1 + do)
            out.append((g, SelectCut(g, cfg.multiple, cfg.ridge, cfg.refit, "mlp.fc1", "mlp.fc2")))
    return out


def _plain_conv(m) -> bool:
    return type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"


def _shortcut(b) -> tuple[str, str] | None:
    """The downsample's (conv, BatchNorm) paths when it is [pool,] one plain conv, then a BatchNorm."""
    ds = getattr(b, "downsample", None)
    kids = list(ds.named_children()) if isinstance(ds, nn.Sequential) else []
    convs = [j for j, (_, m) in enumerate(kids) if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or not _plain_conv(kids[convs[0]][1]) or convs[0] + 1 >= len(kids) \
            or type(kids[convs[0] + 1][1]) is not nn.BatchNorm2d:
        return None
    return f"downsample.{kids[convs[0]][0]}", f"downsample.{kids[convs[0] + 1][0]}"


def _plain_block(b) -> bool:
    """Every conv plain (a grouped conv2 would leave the block without the width groups that price its reads and
    writes), the stream's writer followed by a BatchNorm, no squeeze-excitation on the stream."""
    last = "conv3" if getattr(b, "conv3", None) is not None else "conv2"
    return (all(_plain_conv(getattr(b, c, None)) for c in ("conv1", "conv2", last))
            and all(type(getattr(b, n, None)) is nn.BatchNorm2d for n in ("bn1", "bn" + last[-1]))
            and isinstance(getattr(b, "se", None) or nn.Identity(), nn.Identity))


def _streams(model, blocks) -> list[Stream]:
    """Stages whose residual width can be cut consistently: a downsample starts the stream, every member is a plain
    block without squeeze-excitation, the next stage's first block or a plain classifier on average pooling reads it."""
    segs, cur = [], None
    for i, b in enumerate(blocks):
        if getattr(b, "downsample", None) is not None:
            cur = [i]
            segs.append(cur)
        elif cur is not None:
            cur.append(i)
    out = []
    for j, members in enumerate(segs):
        first = blocks[members[0]]
        sc = _shortcut(first)
        if sc is None or not all(_plain_block(blocks[i]) for i in members):
            continue
        width = first.get_submodule(sc[0]).out_channels
        last = ("conv3", "bn3") if getattr(first, "conv3", None) is not None else ("conv2", "bn2")
        if j + 1 < len(segs):
            nxt = segs[j + 1][0]
            nsc = _shortcut(blocks[nxt])
            if nxt != members[-1] + 1 or nsc is None or not _plain_block(blocks[nxt]):
                continue
            out.append(Stream(members, last, sc, nxt, nsc, None))
            continue
        fc, pool = getattr(model, "fc", None), getattr(model, "global_pool", getattr(model, "avgpool", None))
        avg = isinstance(pool, nn.AdaptiveAvgPool2d) or getattr(pool, "pool_type", None) == "avg"  # timm's pool
        if members[-1] == len(blocks) - 1 and type(fc) is nn.Linear and fc.in_features == width and avg:
            out.append(Stream(members, last, sc, None, None, "fc"))
    return out


def _resnet_groups(model, blocks, names, calib, cfg) -> tuple[list[tuple[Group, object]], list[Link]]:
    """conv1 -> conv2 (and conv2 -> conv3 in a bottleneck); a stage's residual width, whole stages only."""
    streams = _streams(model, blocks)
    convs = [c for b in blocks for c in (b.conv1, b.conv2, getattr(b, "conv3", None)) if c is not None]
    convs += [blocks[s.members[0]].get_submodule(s.shortcut[0]) for s in streams]
    pos = {}
    if calib is not None:  # positions per image of each conv's output, for the FLOP costs
        outs = capture(_Chain(blocks), convs, calib[:1])
        pos = {id(c): o.shape[-1] * o.shape[-2] for c, o in zip(convs, outs)}
    out, links = [], []
    reads, writes = {}, {}  # block -> the stream group its input / output is
    for s in streams:
        name = names[s.members[0]].rpartition(".")[0] or names[s.members[0]]  # the stage, e.g. layer2
        first = blocks[s.members[0]]
        ds = first.get_submodule(s.shortcut[0])
        g = Group(name, "residual", s.members[0], ds.out_channels, 1, 0.0, 2.0 * (len(s.members) + 1))
        writes.update({i: g for i in s.members})
        reads.update({i: g for i in s.members[1:]})
        if s.nxt is not None:
            reads[s.nxt] = g
        else:
            fc = model.get_submodule(s.head)
            g.flops, g.params = g.flops + fc.out_features, g.params + fc.out_features
        out.append((g, StreamCut(g, cfg.multiple, cfg.ridge, cfg.refit, s)))
    for g, c in list(out):  # the shortcut conv reads the previous stream (a link) or the stem's fixed width
        ds = blocks[g.block].get_submodule(c.s.shortcut[0])
        if g.block in reads:
            links.append(Link(reads[g.block].name, g.name, pos.get(id(ds), 0), 1))
        else:
            g.flops, g.params = g.flops + pos.get(id(ds), 0) * ds.in_channels, g.params + ds.in_channels

    def term(g: Group, other: Group | None, fixed: int, flops: float, params: float, first: bool) -> None:
        """A conv between g and a stream (other) when it is cut, else g's own cost at the stream's fixed width."""
        if other is None:
            g.flops, g.params = g.flops + flops * fixed, g.params + params * fixed
        else:
            links.append(Link(other.name, g.name, flops, params) if first else Link(g.name, other.name, flops, params))

    for i, (b, name) in enumerate(zip(blocks, names)):
        c1, c2, c3 = b.conv1, b.conv2, getattr(b, "conv3", None)
        if not (_plain_conv(c1) and _plain_conv(c2)):
            continue
        k1, k2 = c1.kernel_size[0] * c1.kernel_size[1], c2.kernel_size[0] * c2.kernel_size[1]
        p1, p2 = pos.get(id(c1), 0), pos.get(id(c2), 0)
        if c3 is None:  # BasicBlock: conv1's channels feed conv2
            g = Group(f"{name}.conv1", "conv", i, c1.out_channels, 1, 0.0, 2.0)
            term(g, reads.get(i), c1.in_channels, p1 * k1, k1, True)
            term(g, writes.get(i), c2.out_channels, p2 * k2, k2, False)
            out.append((g, SelectCut(g, cfg.multiple, cfg.ridge, cfg.refit, "conv1", "conv2", "bn1", "bn2")))
            continue
        inner = _plain_conv(c3) and isinstance(getattr(b, "aa", None) or nn.Identity(), nn.Identity)
        p3 = pos.get(id(c3), 0)
        g1 = Group(f"{name}.conv1", "conv", i, c1.out_channels, 1, 0.0, 2.0)
        term(g1, reads.get(i), c1.in_channels, p1, 1, True)
        if inner:
            g2 = Group(f"{name}.conv2", "conv", i, c2.out_channels, 1, 0.0, 2.0)
            term(g2, writes.get(i), c3.out_channels, p3, 1, False)
            links.append(Link(g1.name, g2.name, p2 * k2, k2))
        else:
            g1.flops, g1.params = g1.flops + p2 * k2 * c2.out_channels, g1.params + k2 * c2.out_channels
            if i in writes:  # conv3 reads conv2's fixed width and writes the stream
                writes[i].flops += p3 * c3.in_channels
                writes[i].params += c3.in_channels
        out.append((g1, SelectCut(g1, cfg.multiple, cfg.ridge, cfg.refit, "conv1", "conv2", "bn1", "bn2")))
        if inner:
            out.append((g2, SelectCut(g2, cfg.multiple, cfg.ridge, cfg.refit, "conv2", "conv3", "bn2", "bn3")))
    return out, links


class _Chain(nn.Module):
    """The residual blocks alone, in order: run on the first block's input, it gives every conv's output shape."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = blocks

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def _groups(model, adapter, calib, cfg) -> tuple[list[nn.Module], list[tuple[Group, object]], list[Link]]:
    blocks, names = _chain(model, adapter)
    if adapter.family == "vit":
        return blocks, _vit_groups(blocks, names, adapter.describe(model)["tokens"], cfg), []
    if calib is not None:
        calib = capture(model, [blocks[0]], calib[:1], inputs=True)[0]
    return blocks, *_resnet_groups(model, blocks, names, calib, cfg)


# ------------------------------------------------------------------ budget
def _coster(groups: list[Group], links: list[Link], full: dict[str, int], budget: str):
    """cost(widths) of the selected groups: their own terms and every link touching one (the other end at its
    width, or full when not selected)."""
    sel = {g.name for g in groups}
    mine = [l for l in links if l.a in sel or l.b in sel]
    flops = budget == "flops"

    def cost(widths: dict[str, int]) -> float:
        total = sum(widths[g.name] * (g.flops if flops else g.params) for g in groups)  # per unit, all heads
        return total + sum(widths.get(l.a, full[l.a]) * widths.get(l.b, full[l.b]) * (l.flops if flops else l.params)
                           for l in mine)
    return cost


def _round(allowed: list[int], x: float, limit: float | None) -> int:
    """An allowed width for x: the largest at or below it, or (limit) the nearest but not below limit * x."""
    if limit is None:
        return max([w for w in allowed if w <= max(x, 1e-9)] or [min(allowed)])
    near = min(allowed, key=lambda w: (abs(w - x), -w))
    return near if near >= limit * x else min([w for w in allowed if w > near] or [near])


def _uniform(groups, cuts, target, cost, round_limit: float | None = None) -> dict[str, int]:
    """One fraction f of every width, the largest within the target, then top-ups. Each width is f x full rounded down
    to an allowed one, or with round_limit (the traced graph's CNNs) rounded as timm's and torchvision's make_divisible
    do: to the nearest, never below round_limit x f x full. Rounding down cut the narrow early widths of a CNN most
    (mobilenet_v2's 16- and 32-wide streams to 8 and 16, where the same network built at f keeps 16 and 24)."""
    def at(f):
        return {g.name: _round(cuts[g.name].widths(), f * g.full, round_limit) for g in groups}

    limit = target * cost({g.name: g.full for g in groups}) * (1 + 1e-9)
    lo, hi = 0.0, 1.0
    for _ in range(30):  # cost grows with f: the largest f within the target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(at(mid)) <= limit else (lo, mid)
    widths = at(lo)
    # every width rounds down at once, so the fraction alone undershoots (42.6% of the FLOPs for a 50% target on
    # the shared ViT): top up, one step of the relatively narrowest width at a time, while the target holds
    while True:
        ups = []
        for g in groups:
            bigger = [w for w in cuts[g.name].widths() if w > widths[g.name]]
            trial = {**widths, g.name: min(bigger)} if bigger else None
            if trial and cost(trial) <= limit:
                ups.append((widths[g.name] / g.full, g.name, trial))
        if not ups:
            return widths
        widths = min(ups, key=lambda u: u[:2])[2]


def _graph_uniform(groups, cuts, target, cost) -> dict[str, int]:
    return _uniform(groups, cuts, target, cost, round_limit=0.9)


def _greedy(groups, cuts, curves, target, coster) -> dict[str, int]:
    """Least calibration error per unit of cost saved, one width step at a time."""
    widths = {g.name: g.full for g in groups}
    total = coster(widths)
    cost = total
    while cost > target * total * (1 + 1e-9):
        best = None
        for g in groups:
            smaller = [w for w in cuts[g.name].widths() if w < widths[g.name]]
            if not smaller:
                continue
            nxt = max(smaller)
            trial = {**widths, g.name: nxt}
            saved = cost - coster(trial)
            score = (curves[g.name][nxt] - curves[g.name][widths[g.name]]) / max(saved, 1e-12)
            if best is None or score < best[0]:
                best = (score, g.name, nxt, saved)
        if best is None:
            break
        widths[best[1]] = best[2]
        cost -= best[3]
    return widths


# ------------------------------------------------------------------ applying
def _walk(model, blocks, calib, per_block, h: torch.Tensor | None = None) -> None:
    """Calls per_block(i, block, h) with each block's input on calib (`h`: the first block's, when known), the
    model changing as it goes."""
    h = capture(model, [blocks[0]], calib, inputs=True)[0] if h is None else h
    with torch.no_grad():
        for i, blk in enumerate(blocks):
            per_block(i, blk, h)
            h = blk(h)


def _survey(model, blocks, found, calib) -> dict[str, dict[int, float]]:
    curves = {}

    def per_block(i, blk, h):
        for g, cut in found:
            if g.block == i:
                curves[g.name] = cut.survey_in(model, blocks, calib, blk, h)

    _walk(model, blocks, calib, per_block)
    return curves


def _cut(model, blocks, found, widths: dict[str, int], calib) -> dict[str, float]:
    errors = {}
    h_ref = capture(model, [blocks[0]], calib, inputs=True)[0]  # the teacher's chain, block by block
    streams = [(g, c) for g, c in found if isinstance(c, StreamCut) and widths.get(g.name, g.full) < g.full]
    refs, rows, readers, logits = None, {}, {}, None
    if streams:  # residual widths first, whole stages at once: the blocks are no longer their own references
        refs = [copy.deepcopy(b) for b in blocks]
        with torch.no_grad():
            logits = model(calib)
        keeps = {}
        for g, c in streams:
            keeps[g.name], errors[g.name] = c.choose(model, blocks, calib, widths[g.name])
        for g, c in streams:
            c.narrow(model, blocks, keeps[g.name])
            rows.update({(i, conv): keeps[g.name] for i, conv, _ in c.writers()})
            readers.update({(i, conv): bn for i, conv, bn in c.readers()})
    dirty = bool(streams)  # something upstream was narrowed: later consumers are refit even at full width
    cut_ridge, refit = found[0][1].ridge, found[0][1].refit

    def per_block(i, blk, h):
        nonlocal h_ref, dirty
        ref = copy.deepcopy(blk) if refs is None else refs[i]
        for (j, conv), bn in readers.items():  # convs reading a narrowed stream: refit to the teacher's outputs
            if j == i and refit:
                refit_reader(blk, ref, h, h_ref, conv, bn, cut_ridge, rows.get((i, conv)))
        for g, cut in found:
            if g.block == i and g.name in widths and not isinstance(cut, StreamCut):
                key = (i, getattr(cut, "consumer", None))  # a consumer writing a narrowed stream fits those rows
                errors[g.name] = cut.cut(blk, ref, h, h_ref, widths[g.name], dirty,
                                         **({"rows": rows[key]} if key in rows else {}))
                dirty |= widths[g.name] < g.full
        h_ref = ref(h_ref)

    _walk(model, blocks, calib, per_block, h_ref)  # nothing is cut yet: the first block's input is the teacher's
    for g, c in streams:
        if c.s.head is not None and refit:
            c.refit_head(model, calib, logits)
    return errors


class _SharedBlur(nn.Module):
    """A fixed blur, the same filter for every channel (timm BlurPool2d's), applied to each channel as its own image:
    the channel count comes from the input, and the exported graph has no per-channel weight sized for one width."""

    def __init__(self, blur: nn.Module):
        super().__init__()
        self.register_buffer("filt", blur.filt[:1].clone(), persistent=False)  # (1, 1, k, k)
        self.stride, self.padding, self.pad_mode = blur.stride, list(blur.padding), blur.pad_mode

    def forward(self, x):
        b, c, h, w = x.shape
        x = F.pad(x, self.padding, mode=self.pad_mode).reshape(b * c, 1, h + self.padding[2] + self.padding[3],
                                                                w + self.padding[0] + self.padding[1])
        y = F.conv2d(x, self.filt, stride=self.stride)
        return y.reshape(b, c, y.shape[-2], y.shape[-1])


def _channel_free_blur(model) -> None:
    """Anti-aliased blocks (timm BlurPool2d, resnetblur) hold one copy of a fixed blur filter per channel, sized for
    the full width: each becomes one shared filter applied per channel (exact: every channel's filter is the same),
    so the convs around it narrow freely."""
    for name, m in list(model.named_modules()):
        filt = getattr(m, "filt", None)
        if (isinstance(getattr(m, "channels", None), int) and isinstance(filt, torch.Tensor) and filt.dim() == 4
                and filt.shape[:2] == (m.channels, 1) and bool((filt == filt[:1]).all())
                and isinstance(getattr(m, "padding", None), (list, tuple)) and len(m.padding) == 4):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, _SharedBlur(m))


@register_pass("width", WidthConfig, families={"vit", "resnet", "other"},
               summary="narrower dense layers: keep MLP units / head dims / inner channels, refit by least squares",
               fits_batchnorm=True)  # a refit conv's fitted constant lives in its BatchNorm's running mean
def width(model, adapter, cfg: WidthConfig, ctx: PassContext) -> PassResult:
    if ctx.replay is not None and "graph" in ctx.replay:
        return graph_replay(model, ctx.replay)
    if ctx.replay is not None and "mlps" in ctx.replay:
        return mlp_width(model, adapter, cfg, ctx)
    if adapter.family == "vit" and getattr(adapter, "unmapped", None):
        return _unmapped_vit(model, adapter, cfg, ctx)
    if adapter.family == "other":  # no family: a CNN by its traced channel graph, else the MLPs found by structure
        if _convnet(model) and "conv" in cfg.layers:
            return graph_width(model, cfg, ctx, _graph_uniform)
        return mlp_width(model, adapter, cfg, ctx)
    if adapter.family != "resnet" or ctx.replay is not None or "conv" not in cfg.layers:
        return _family_width(model, adapter, cfg, ctx)
    try:  # blocks the family code knows (its stage-wide residual cut); where it refuses, the traced graph
        return _family_width(model, adapter, cfg, ctx)
    except InputError:
        return graph_width(model, cfg, ctx, _graph_uniform)


def _unmapped_vit(model, adapter, cfg: WidthConfig, ctx: PassContext) -> PassResult:
    """Transformer blocks with no neutral form (post-norm, sequence-first, blocks returning tuples): their MLPs are
    found by structure and checked independent on real inputs (_width_mlp.py), which needs no block wiring. Head
    widths need the block's attention written out as q.k and v->proj: kept, and said so."""
    res = mlp_width(model, adapter, cfg, ctx)
    kept = [k for k in cfg.layers if k in ("qk", "vo")]
    if kept:
        res.changes.insert(1, f"width: {', '.join(kept)} kept at full width: blocks {unmapped_text(adapter.unmapped)} "
                              "have no neutral ViT form (pre-norm x + attn(norm1 x), then + mlp(norm2 x)), so only "
                              "their MLPs narrow")
    return res


def _convnet(model: nn.Module) -> bool:
    """Convs past a stem and no attention: the traced graph's case (a ViT's heads are the family code's)."""
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    attention = any(isinstance(m, nn.MultiheadAttention) or heads_of(m) for m in model.modules())
    return convs >= 2 and not attention


def _family_width(model, adapter, cfg: WidthConfig, ctx: PassContext) -> PassResult:
    """The ViT heads/MLPs and ResNet blocks the family code recognises (DESIGN §9)."""
    if adapter.family == "resnet":
        _channel_free_blur(model)
        norms = sorted({type(m).__name__ for b in adapter.res_blocks(model) for n in ("bn1", "bn2", "bn3")
                        if (m := getattr(b, n, None)) is not None and not isinstance(m, nn.modules.batchnorm._BatchNorm)})
        if norms:  # GroupNorm: its statistics span groups of channels, so a dropped channel changes the others
            raise InputError(f"width: this model's residual blocks normalise with {', '.join(norms)}, whose statistics "
                             "span several channels, so channels cannot be removed one by one; lowrank is the pass "
                             "for this model (it factorises the convs and keeps every channel)")
    blocks, found, links = _groups(model, adapter, ctx.calib, cfg)
    if ctx.replay is not None:  # rebuild the recorded widths; the weights are loaded afterwards
        cuts = {g.name: c for g, c in found}
        for name, info in ctx.replay["groups"].items():
            cuts[name].replay_in(model, blocks, info["width"][1])
        return PassResult(model, [], ctx.replay)
    full = {g.name: g.full for g, _ in found}
    found = [(g, c) for g, c in found if g.kind in cfg.layers]
    if not found:
        grouped = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
        kinds = ", ".join(sorted({type(b).__name__ for b in blocks}))
        why = (f"; its {grouped} grouped convs (ResNeXt-style) are not narrowed by width: lowrank is the pass for this "
               "model (it factorises the 1x1 convs around them)" if grouped else
               f"; its blocks ({kinds}) hold no such chain: lowrank is the pass for this model (any plain Linear/Conv2d)")
        raise InputError(f"width: this {adapter.name} model has no widths of kinds {cfg.layers} that the pass can narrow "
                         f"(ViT: mlp, qk, vo; ResNet: conv, residual){why}")
    groups = [g for g, _ in found]
    cuts = {g.name: c for g, c in found}
    cost = _coster(groups, links, full, cfg.budget)
    total = selected = cost({g.name: g.full for g in groups})
    floor = cost({g.name: min(cuts[g.name].widths()) for g in groups})
    target = cfg.target
    if target is not None and cfg.scope == "model":  # the rest of the model stays as it is
        whole = whole_cost(model, cfg.budget, tuple(ctx.calib.shape[1:]))
        target = layer_share(cfg.target, whole, total)
        floor, total = floor + whole - total, whole
    if target is not None and (target <= 0 or floor > cfg.target * total * (1 + 1e-9)):
        raise InputError(f"width: target {cfg.target} is out of reach: at the smallest widths (multiple {cfg.multiple}) "
                         f"{'the model keeps' if cfg.scope == 'model' else 'the selected layers keep'} "
                         f"{floor / total:.0%} of {'its' if cfg.scope == 'model' else 'their'} {cfg.budget}; raise "
                         f"target, lower multiple or select more layer kinds")
    plans = {}
    if cfg.keep is not None:
        plans["keep"] = {g.name: max([w for w in cuts[g.name].widths() if w <= cfg.keep * g.full] or
                                     [min(cuts[g.name].widths())]) for g in groups}
    if cfg.target is not None and cfg.allocate in ("uniform", "auto"):
        plans["uniform"] = _uniform(groups, cuts, target, cost)
    if cfg.target is not None and cfg.allocate in ("greedy", "auto"):
        plans["greedy"] = _greedy(groups, cuts, _survey(model, blocks, found, ctx.calib), target, cost)
    tried = {}
    with torch.no_grad():  # allocations that compete are compared by calibration KL; a single one is not scored
        ref = model(ctx.calib) if len(plans) > 1 else None
    for how, widths in plans.items():
        trial = copy.deepcopy(model) if len(plans) > 1 else model
        # the cuts hold block indices and attribute paths only, so they serve the copy's own blocks
        errors = _cut(trial, _chain(trial, adapter)[0], found, widths, ctx.calib)
        with torch.no_grad():
            tried[how] = (kl(ref, trial(ctx.calib)) if ref is not None else None, trial, errors, widths)
    how = min(tried, key=lambda k: tried[k][0] or 0.0)
    score, model, errors, widths = tried[how]
    kept = cost(widths)
    scored = {k: round(v[0], 6) for k, v in tried.items() if v[0] is not None}
    details = {"allocate": how, "kept": round(kept / selected, 6), "budget": cfg.budget, **({"kl": scored} if scored else {}),
               "groups": {g.name: {"kind": g.kind, "width": [g.full, widths[g.name]], "heads": g.heads,
                                   "rel_error": round(errors.get(g.name, 0.0), 6)} for g in groups}}
    changes = [f"width ({'refit' if cfg.refit else 'no refit'}, {how} allocation"
               + ("; calibration KL " + ", ".join(f"{k} {v:.4g}" for k, v in scored.items()) if scored else "")
               + f"): the selected layers keep {kept / selected:.1%} of their {cfg.budget}"]
    for g in groups:
        k = widths[g.name]
        what = f"{k}/{g.full} per head x {g.heads}" if g.heads > 1 else f"{k}/{g.full}"
        changes.append(f"{g.name} ({g.kind}): width {what}, calibration output error "
                       f"{100 * errors.get(g.name, 0.0) ** 0.5:.2f}%")
    return PassResult(model, changes, details)
