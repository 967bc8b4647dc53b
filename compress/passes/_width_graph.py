"""width on any CNN whose channel graph Torch-Pruning's DependencyGraph traces (issue #43).

The DependencyGraph (autograd tracing) finds the groups of channels that must go together: through residual adds,
concatenations and splits, grouped and depthwise convs, BatchNorm/GroupNorm/LayerNorm, SE gates, the flatten before
a classifier. What is ours: each channel's importance (its activation energy on the calibration batch times the
energy of the consumer weights that read it), channel units (a GroupNorm's groups go whole; a grouped conv of 4 or
more groups loses whole groups, its input and output side together, so each kept group stays as wide as its kernels
were; one of 2-3 groups loses the same positions in every group), widths on `multiple`, a uniform allocation
reaching the FLOP target through a cost model of every conv/linear, and the ridge least-squares refit of each plain
consumer to the teacher's outputs. The plan is Torch-Pruning's pruning history (root layer, indices) and the names of
the convs that lost whole groups, so `load_compressed` replays it on a fresh model.
"""
from __future__ import annotations

import copy
import functools
import re

import numpy as np
import torch
from torch import nn

from ..core.errors import InputError
from ..core.probe import capture
from ..core.registry import PassResult
from . import _width_fit as fit
from ._scope import layer_share, whole_cost
from ._width_groups import _patches, _rows

MAX_ROWS = 32768  # refit rows per consumer (a random subset above this bounds the Gram's cost)


class _Unit:
    """What `width.py`'s uniform allocation needs of a group: its name, full width, allowed widths."""

    def __init__(self, name: str, full: int, allowed: list[int]):
        self.name, self.full, self._allowed = name, full, allowed

    def widths(self) -> list[int]:
        return self._allowed


def _tp():
    import torch_pruning as tp  # the bench's dependency; imported when the graph path runs
    return tp


MIN_WHOLE = 4  # a grouped conv of this many groups or more loses whole groups (regnet_y_800mf: group width 16 -> 8
# kept 32 groups and ran at 0.60 of the efficiency of the same network built narrower, which keeps width 16)


def _whole_convs(model: nn.Module, head: nn.Module | None) -> list[str]:
    """Grouped (not depthwise) convs that lose whole groups."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m is not head
            and MIN_WHOLE <= m.groups < m.in_channels and m.out_channels % m.groups == 0]


@functools.cache
def _whole():
    """Torch-Pruning's conv pruner for a conv losing whole groups: the output side slices the dropped groups' filters
    and the group count follows; the input side only counts (each kept filter reads its own group's channels)."""
    tp = _tp()

    class WholeGroups(tp.pruner.function.ConvPruner):
        def prune_out_channels(self, layer, idxs):
            per = layer.out_channels // layer.groups
            layer = super().prune_out_channels(layer, idxs)
            layer.groups = layer.out_channels // per
            return layer

        def prune_in_channels(self, layer, idxs):
            layer.in_channels -= len(idxs)
            return layer
    return WholeGroups()


_SUBS = {}  # each conv class -> its marked subclass


class _Marked:
    """While open, the named convs are of a subclass of their own class (same forward) that Torch-Pruning's
    customized_pruners maps to `_whole()`: it looks pruners up by exact class, not by instance."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.names = names
        self.mods = [model.get_submodule(n) for n in names]
        self.classes = [type(m) for m in self.mods]
        for c in self.classes:
            _SUBS.setdefault(c, type(f"Whole{c.__name__}", (c,), {}))

    def pruners(self) -> dict:
        return {_SUBS[c]: _whole() for c in set(self.classes)}

    def __enter__(self):
        for m, c in zip(self.mods, self.classes):
            m.__class__ = _SUBS[c]
        return self

    def __exit__(self, *exc):
        for m, c in zip(self.mods, self.classes):
            m.__class__ = c


def _layers(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, float, torch.Tensor]]:
    """Every Conv2d/Linear called on x, in call order: (name, module, MACs per image, mean square of each input
    channel)."""
    found, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, out, name=name):
                a, b = args[0].detach(), len(args[0])
                per = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1] \
                    if isinstance(mod, nn.Conv2d) else mod.in_features
                chan = a.double().pow(2).transpose(0, 1).reshape(a.shape[1], -1).mean(1) if isinstance(mod, nn.Conv2d) \
                    else a.double().pow(2).reshape(-1, a.shape[-1]).mean(0)
                found.setdefault(name, (name, mod, out.numel() / b * per, chan))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return list(found.values())


def _trace(model: nn.Module, x: torch.Tensor, head: nn.Module | None, pruners: dict | None = None):
    tp = _tp()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=x[:1], customized_pruners=pruners,
                                                         ignored_layers=None, verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure to trace is the user's model, refused in one line
        what = (str(e).strip().splitlines() or [""])[0][:160]
        raise InputError(f"width: Torch-Pruning's dependency graph cannot trace this {type(model).__name__} "
                         f"({type(e).__name__}: {what}); lowrank is the pass for this model (it factorises any "
                         "Linear/Conv2d and keeps every channel)") from None


def _is_out(tp, fn) -> bool:
    return fn in (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels,
                  _whole().prune_out_channels)


def _is_in(tp, fn) -> bool:
    return fn in (tp.prune_conv_in_channels, tp.prune_linear_in_channels, _whole().prune_in_channels)


def _is_whole(m) -> bool:
    return type(m) in _SUBS.values()


def _units(tp, group, full: int) -> list[list[int]] | None:
    """The group's root channels in units that go together (union-find): a GroupNorm's groups whole, a grouped conv's
    same position in every group. None when the units differ in size (the group stays whole)."""
    parent = list(range(full))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a, b):
        parent[find(a)] = find(b)

    for item in group.items:
        m, idxs, roots = item.dep.target.module, item.idxs, item.root_idxs
        if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
            by = {}
            for i, r in zip(idxs, roots):
                by.setdefault(i // (m.num_channels // m.num_groups), []).append(r)
        elif isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:  # grouped, not depthwise
            size = (m.out_channels if _is_out(tp, item.dep.handler) else m.in_channels) // m.groups
            by = {}
            for i, r in zip(idxs, roots):  # whole groups, or the same position in every group
                by.setdefault(i // size if _is_whole(m) else i % size, []).append(r)
        elif isinstance(m, tp.ops._SplitOp) and m.offsets and len({b - a for a, b in zip(m.offsets, m.offsets[1:])}) == 1:
            size = m.offsets[1] - m.offsets[0]  # equal parts (chunk): each part keeps the same positions
            by = {}
            for i, r in zip(idxs, roots):
                by.setdefault(i % size, []).append(r)
        else:
            continue
        for rs in by.values():
            for r in rs[1:]:
                union(rs[0], r)
    out = {}
    for i in range(full):
        out.setdefault(find(i), []).append(i)
    units = list(out.values())
    return units if len({len(u) for u in units}) == 1 else None


def _opaque(tp, dg, group) -> str | None:
    """An op the group's channels pass through that Torch-Pruning takes as elementwise but is not: an autograd node
    the trace cannot see into (a Python autograd.Function, activation checkpointing: its grad_fn name has no torch op
    number), which may mix channels or hide layers, or F.pad over the channels (a ResNet's option-A shortcut), whose
    amounts are constants in forward."""
    for item in group.items:
        m = item.dep.target.module
        if not isinstance(m, tp.ops._ElementWiseOp):
            continue
        if not re.search(r"Backward\d+$", str(m._grad_fn)):
            return str(m._grad_fn)
        fn = getattr(dg.module2node.get(m), "grad_fn", None)
        pad = getattr(fn, "_saved_pad", None) if str(m._grad_fn).startswith("ConstantPadNd") else None
        if pad is not None and any(pad[4:6]):
            return "F.pad over channels"
    return None


def _through(tp, group, kind: str) -> bool:
    """The group's channels reach a split / a reshape."""
    op = {"split": tp.ops._SplitOp, "reshape": tp.ops._ReshapeOp}[kind]
    return any(isinstance(item.dep.target.module, op) for item in group.items)


def _importance(tp, group, full: int, energy: dict) -> torch.Tensor:
    """Per root channel: E[x_c^2] times the squared norm of the consumer weights reading c, summed over the group's
    consumers; the producers' output weight norms where nothing scorable reads the group."""
    score = torch.zeros(full, dtype=torch.float64)
    for item in group.items:
        m, fn = item.dep.target.module, item.dep.handler
        if not _is_in(tp, fn) or id(m) not in energy:
            continue
        w = m.weight.detach().double()
        if isinstance(m, nn.Conv2d):
            g, cin = m.groups, w.shape[1]
            per_out = w.shape[0] // g
            colw = torch.stack([w[(c // cin) * per_out:(c // cin + 1) * per_out, c % cin].pow(2).sum()
                                for c in range(m.in_channels)])
        else:
            colw = w.pow(2).sum(0)
        e = energy[id(m)]
        if len(e) != len(colw):
            continue
        s = (e * colw)[torch.as_tensor(item.idxs, dtype=torch.long)]
        score.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), s)
    if not bool(score.gt(0).any()):
        for item in group.items:
            m, fn = item.dep.target.module, item.dep.handler
            if _is_out(tp, fn) and getattr(m, "weight", None) is not None:
                w = m.weight.detach().double()
                s = w.pow(2).reshape(w.shape[0], -1).sum(1)[torch.as_tensor(item.idxs, dtype=torch.long)]
                score.index_add_(0, torch.as_tensor(item.root_idxs, dtype=torch.long), s)
    return score


def _allowed(units: list[list[int]], full: int, multiple: int) -> list[int]:
    """Widths of whole units on `multiple` (any number of units where no width but full is on it), full included."""
    size = len(units[0])
    widths = [size * k for k in range(1, len(units) + 1)]
    on = [w for w in widths if w % multiple == 0 or w == full]
    return on if len(on) > 1 else widths


def _head(layers, model, x) -> nn.Module | None:
    """The classifier: the last Conv2d/Linear called, when its outputs are the logits' width."""
    if not layers:
        return None
    with torch.no_grad():
        out = model(x[:1])
    out = out[0] if isinstance(out, (tuple, list)) else out
    last = layers[-1][1]
    width = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    return last if torch.is_tensor(out) and out.shape[-1] == width else None


def _gn_fix(model: nn.Module, sizes: dict[str, int]) -> None:
    """Torch-Pruning keeps num_groups; whole groups were removed, so the group count follows the channels."""
    for name, size in sizes.items():
        m = model.get_submodule(name)
        m.num_groups = m.num_channels // size


def _cost_model(tp, layers, groups, names) -> tuple:
    """MACs per image of the layers the groups touch as a function of the kept fractions: sum over layers of
    macs * (1 - in_share . cut) * (1 - out_share . cut). A depthwise conv costs per output channel only."""
    idx = {id(m): i for i, (_, m, _, _) in enumerate(layers)}
    n, k = len(layers), len(groups)
    s_in, s_out = np.zeros((n, k)), np.zeros((n, k))
    for j, (group, full) in enumerate(groups):
        for item in group.items:
            m, fn = item.dep.target.module, item.dep.handler
            if id(m) not in idx:
                continue
            i = idx[id(m)]
            if _is_out(tp, fn):
                width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                s_out[i, j] += len(item.idxs) / width
            elif _is_in(tp, fn) and not (isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1) \
                    and not _is_whole(m):  # a conv losing whole groups costs per output group only
                s_in[i, j] += len(item.idxs) / (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features)
    macs = np.array([l[2] for l in layers])
    touched = (s_in.sum(1) + s_out.sum(1)) > 0
    macs, s_in, s_out = macs[touched], s_in[touched], s_out[touched]
    fulls = np.array([full for _, full in groups], dtype=float)

    def cost(widths: dict[str, int]) -> float:
        cut = 1 - np.array([widths[nm] for nm in names]) / fulls
        return float((macs * (1 - s_in @ cut) * (1 - s_out @ cut)).sum())
    return cost


class _Inconsistent(Exception):
    """The pruned model does not run: a coupling the trace missed (a split written with fixed sizes, Res2Net-style)."""


def graph_width(model: nn.Module, cfg, ctx, uniform) -> PassResult:
    """Plan, prune and refit (see the module docstring). Where the pruned model does not run, once more with the
    channels that reach a split left whole (a split written with fixed sizes), then also those that reach a reshape
    (ResNeSt's radix softmax: Torch-Pruning does not couple its attention to the channels it weighs), then a refusal.
    `uniform`: width.py's allocation (groups, cuts, target, cost) -> widths, given by the caller (no import cycle)."""
    if cfg.budget != "flops":
        raise InputError("width: on a traced channel graph the budget is flops; set budget: flops, or use lowrank")
    levels = [(), ("split",), ("split", "reshape")]
    for i, whole in enumerate(levels):
        try:
            return _graph_width(copy.deepcopy(model) if i + 1 < len(levels) else model, cfg, ctx, whole, uniform)
        except _Inconsistent as e:
            why = e
    raise InputError(f"width: the channel groups Torch-Pruning traced in this {type(model).__name__} do not prune "
                     f"consistently ({why}); lowrank is the pass for this model")


def _graph_width(model: nn.Module, cfg, ctx, whole: tuple, uniform) -> PassResult:
    tp = _tp()
    calib = ctx.calib
    teacher = copy.deepcopy(model)
    layers = _layers(model, calib[:16])
    head = _head(layers, model, calib)
    gn = {n: m.num_channels // m.num_groups for n, m in model.named_modules()
          if isinstance(m, nn.GroupNorm) and m.num_groups > 1}
    with _Marked(model, _whole_convs(model, head)) as mk:  # the convs losing whole groups: marked until pruned
        return _graph_width_marked(model, teacher, layers, head, gn, mk, cfg, ctx, whole, uniform)


def _conv_groups(tp, m, item, units) -> list[int] | None:
    """For each unit of a group, the one group of conv m whose channels it is (None: the units are not m's groups)."""
    size = (m.out_channels if _is_out(tp, item.dep.handler) else m.in_channels) // m.groups
    conv = dict(zip(item.root_idxs, item.idxs))
    js = [{conv[r] // size for r in unit if r in conv} for unit in units]
    if len(units) != m.groups or any(len(j) != 1 for j in js):
        return None
    out = [j.pop() for j in js]
    return out if sorted(out) == list(range(m.groups)) else None


def _links(tp, candidates: dict) -> tuple[dict, set]:
    """Per conv losing whole groups: the group narrowing its input (A) and the one narrowing its output (B), which
    must drop the same conv groups: {id(conv): (A, B, A's unit -> conv group, B's, groups)}. The second value: the
    groups that stay whole because their partner cannot follow (not narrowable, not in units of whole conv groups,
    shared with another such conv)."""
    sides, owner = {}, {}
    for nm, (group, _, _) in candidates.items():
        for item in group.items:
            m, fn = item.dep.target.module, item.dep.handler
            side = ("B" if _is_out(tp, fn) else "A" if _is_in(tp, fn) else None) if _is_whole(m) else None
            if side is not None:
                sides.setdefault(id(m), (m, {"A": [], "B": []}))[1][side].append((nm, item))
                owner.setdefault(nm, set()).add(id(m))
    links, off = {}, set()
    for key, (m, got) in sides.items():
        both = got["A"] + got["B"]
        ok = len(got["A"]) == 1 and len(got["B"]) == 1 and all(len(owner[nm]) == 1 for nm, _ in both)
        maps = [_conv_groups(tp, m, item, candidates[nm][2]) for nm, item in both] if ok else [None]
        if all(mp is not None for mp in maps):
            links[key] = (got["A"][0][0], got["B"][0][0], maps[0], maps[1], m.groups)
        else:
            off.update(nm for nm, _ in both)
    return links, off


def _graph_width_marked(model, teacher, layers, head, gn, mk, cfg, ctx, whole, uniform) -> PassResult:
    tp = _tp()
    calib = ctx.calib
    dg = _trace(model, calib, head, mk.pruners())
    raw = list(dg.get_all_groups(ignored_layers=[head] if head is not None else [],
                                 root_module_types=[nn.Conv2d, nn.Linear]))
    energy = {id(m): e for _, m, _, e in layers}
    groups, units, cuts, scores, opaque, candidates = [], {}, {}, {}, set(), {}
    for group in raw:
        root = group[0].dep.target.module
        full = len(group[0].idxs)
        op = _opaque(tp, dg, group)
        op = op or next((k for k in whole if _through(tp, group, k)), None)
        if op is not None:
            opaque.add(op)
            continue
        u = _units(tp, group, full)
        if u is None or len(u) < 2:
            continue
        candidates[dg._module2name[root]] = (group, full, u)
    links, off = _links(tp, candidates)
    for name, (group, full, u) in candidates.items():
        if name in off:
            continue
        groups.append((group, full))
        units[name] = u
        cuts[name] = _Unit(name, full, _allowed(u, full, cfg.multiple))
        scores[name] = _importance(tp, group, full, energy)
    if not groups:
        through = [o for o in opaque if o not in ("split", "reshape")]
        why = (f"every channel group passes through {', '.join(sorted(through))}, which its trace cannot see into"
               if through else "no channel group can be narrowed")
        raise InputError(f"width: Torch-Pruning's dependency graph of this {type(model).__name__}: {why}; lowrank is "
                         "the pass for this model (it factorises any Linear/Conv2d and keeps every channel)")
    names = [dg._module2name[g[0].dep.target.module] for g, _ in groups]
    cost = _cost_model(tp, layers, groups, names)
    fulls = {nm: cuts[nm].full for nm in names}
    selected = cost(fulls)
    floor = cost({nm: min(cuts[nm].widths()) for nm in names})
    whole = whole_cost(model, "flops", tuple(calib.shape[1:]))
    if cfg.keep is not None:
        widths = {nm: max([w for w in cuts[nm].widths() if w <= cfg.keep * fulls[nm]] or [min(cuts[nm].widths())])
                  for nm in names}
    else:
        target = layer_share(cfg.target, whole, selected) if cfg.scope == "model" else cfg.target
        total = whole if cfg.scope == "model" else selected
        least = floor + (whole - selected if cfg.scope == "model" else 0)
        if target <= 0 or least > cfg.target * total * (1 + 1e-9):
            raise InputError(f"width: target {cfg.target} is out of reach: at the smallest widths (multiple "
                             f"{cfg.multiple}) the {'model keeps' if cfg.scope == 'model' else 'selected layers keep'}"
                             f" {least / total:.0%} of the flops; raise target or lower multiple")
        widths = uniform([cuts[nm] for nm in names], cuts, target, cost)
    # a conv losing whole groups: its input and output groups keep the same conv groups, as many as the narrower
    # asks, ranked by their summed (normalised) importance
    forced = {}
    for a, b, map_a, map_b, n_groups in links.values():
        k = min(widths[a] // len(units[a][0]), widths[b] // len(units[b][0]))
        joint = torch.zeros(n_groups, dtype=torch.float64)
        for nm, mp in ((a, map_a), (b, map_b)):
            per = torch.stack([scores[nm][unit].sum() for unit in units[nm]])
            joint[torch.as_tensor(mp)] += per / per.sum().clamp_min(1e-30)
        top = set(torch.argsort(joint, descending=True)[:k].tolist())
        for nm, mp in ((a, map_a), (b, map_b)):
            widths[nm] = k * len(units[nm][0])
            forced[nm] = [i for i, j in enumerate(mp) if j in top]
    # prune: per group, the units with the least importance go; kept original indices tracked for the refit
    keep_out, keep_in = {}, {}
    for (group, full), nm in zip(groups, names):
        if widths[nm] >= full:
            continue
        u = units[nm]
        rank = forced[nm] if nm in forced else sorted(range(len(u)), key=lambda i: -float(scores[nm][u[i]].sum()))
        kept = sorted(c for i in rank[:widths[nm] // len(u[0])] for c in u[i])
        drop = sorted(set(range(full)) - set(kept))
        root = group[0].dep.target.module
        pg = dg.get_pruning_group(root, group[0].dep.handler, drop)
        for item in pg.items:
            m, fn = item.dep.target.module, item.dep.handler
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            store, width = (keep_out, m.weight.shape[0]) if _is_out(tp, fn) else (keep_in, None)
            if store is keep_in:
                if not _is_in(tp, fn):
                    continue
                width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            cur = store.get(id(m), torch.arange(width))
            mask = torch.ones(len(cur), dtype=torch.bool)
            mask[torch.as_tensor(item.idxs, dtype=torch.long)] = False
            store[id(m)] = cur[mask]
        pg.prune()
    _gn_fix(model, gn)
    try:
        with torch.no_grad():
            got, want = model(calib[:2]), teacher(calib[:2])
        if torch.is_tensor(want) and (not torch.is_tensor(got) or got.shape != want.shape):
            raise RuntimeError(f"the output's shape became {tuple(got.shape) if torch.is_tensor(got) else type(got)}")
    except Exception as e:  # noqa: BLE001 - a coupling the trace missed: retried or refused, never written
        raise _Inconsistent(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}") from None
    refit, skipped = (_refit(model, teacher, layers, keep_in, keep_out, calib, cfg.ridge) if cfg.refit else (0, 0))
    kept = cost(widths)
    share = (kept + (whole - selected)) / whole
    details = {"allocate": "uniform", "kept": round(kept / selected, 6), "budget": "flops",
               "graph": {"input": list(calib.shape[1:]), "history": [[n, bool(o), [int(i) for i in idx]]
                                                                      for n, o, idx in dg.pruning_history()],
                         "group_norm": gn, "whole_groups": mk.names},
               "groups": {nm: {"kind": "conv", "width": [fulls[nm], widths[nm]], "heads": 1} for nm in names}}
    how = "uniform allocation" + ("" if cfg.allocate == "uniform" else f" (allocate {cfg.allocate} is the family path's)")
    changes = [f"width (traced channel graph, {len(names)} groups, {how}, "
               f"{'refit of ' + str(refit) + ' plain consumers' if cfg.refit else 'no refit'}"
               f"{f', {skipped} grouped consumers sliced only' if skipped else ''}): the narrowed layers keep "
               f"{kept / selected:.1%} of their flops, the model {share:.1%}"]
    if opaque:
        changes.append("left whole: the channels that pass through " + ", ".join(sorted(opaque)))
    if off:
        changes.append(f"left whole: {len(off)} channel groups of grouped convs whose input and output sides cannot "
                       "lose the same groups")
    changes += [f"{nm} (conv): width {widths[nm]}/{fulls[nm]}" for nm in names if widths[nm] < fulls[nm]]
    return PassResult(model, changes, details)


def _refit(model, teacher, layers, keep_in, keep_out, calib, ridge) -> tuple[int, int]:
    """Each plain consumer (Linear, or Conv2d with groups 1 and zero padding) whose inputs were narrowed: ridge least
    squares from the student's inputs to the teacher's outputs (its kept rows), in call order. Grouped consumers
    keep their sliced weights. Returns (refit, skipped)."""
    tnames = dict(teacher.named_modules())
    done = skipped = 0
    gen = torch.Generator().manual_seed(0)
    for name, m, _, _ in layers:
        if id(m) not in keep_in:
            continue
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            skipped += 1
            continue
        x = capture(model, [m], calib, inputs=True, stop=True)[0]
        y = capture(teacher, [tnames[name]], calib, stop=True)[0]
        if id(m) in keep_out:
            y = y[:, keep_out[id(m)]] if isinstance(m, nn.Conv2d) else y[..., keep_out[id(m)]]
        if isinstance(m, nn.Conv2d):
            xs, ys, group = _patches(m, x), _rows(y), m.kernel_size[0] * m.kernel_size[1]
        else:  # a Linear reads its last dim, whatever comes before (tokens, channels-last maps)
            xs, ys, group = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), 1
        if len(xs) > MAX_ROWS:
            pick = torch.randperm(len(xs), generator=gen)[:MAX_ROWS]
            xs, ys = xs[pick], ys[pick]
        p = fit.problem(xs, ys, group)
        prior = m.weight.detach().reshape(m.weight.shape[0], -1)
        w = fit.refit(p, list(range(p.units)), ridge, prior, bias=m.bias is not None)
        with torch.no_grad():
            m.weight.copy_(w[:, :prior.shape[1]].reshape(m.weight.shape).to(m.weight.dtype))
            if m.bias is not None:
                m.bias.copy_(w[:, -1].to(m.bias.dtype))
        done += 1
    return done, skipped


def graph_replay(model: nn.Module, details: dict) -> PassResult:
    """The recorded pruning history on a freshly built model (its weights are loaded afterwards)."""
    info = details["graph"]
    x = torch.zeros(1, *info["input"])
    with _Marked(model, info.get("whole_groups", [])) as mk:  # absent in files written before whole-group cuts
        dg = _trace(model, x, None, mk.pruners())
        dg.load_pruning_history([[n, o, idx] for n, o, idx in info["history"]])
    _gn_fix(model, info["group_norm"])
    return PassResult(model, [], details)
