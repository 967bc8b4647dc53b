"""Any nn.Module: the floor under every family. No blocks (passes that rewrite blocks refuse it), but its
Linear / Conv2d layers found by structure, so layer-level passes (lowrank) apply to any model."""
from __future__ import annotations

import re

import torch
from torch import nn

from ..core.errors import InputError
from ..core.modules import ViTBlock
from .base import heads_of, set_module
from .vit_struct import geometry, map_blocks

# a layer inside a module named like this, or inside one that knows its head count, is attention
_ATTN = re.compile(r"(^|[._])(attn|attention|self_attn|mha)([._]|$)", re.I)
_CONTAINERS = ("Sequential", "ModuleList", "ModuleDict")


def module_types(model: nn.Module, limit: int = 8) -> str:
    """The distinct module types, most specific first (no containers, no torch built-ins when others exist)."""
    seen = [t for t in dict.fromkeys(type(m) for m in model.modules()) if t.__name__ not in _CONTAINERS]
    own = [t for t in seen if not t.__module__.startswith("torch.")] or seen
    names = [t.__name__ for t in own]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _period(types: list[type]) -> int | None:
    """The shortest p that repeats the sequence at least twice (types[i] == types[i % p]), else None."""
    return next((p for p in range(1, len(types) // 2 + 1)
                 if len(types) % p == 0 and all(t is types[i % p] for i, t in enumerate(types))), None)


def _block_lists(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """ModuleList / Sequential containers of >= 2 modules of one type: the model's repeated blocks. Also a list that
    repeats a sequence of types holding an attention module: post-LN transformers keep their sub-layers flat
    (vit-pytorch's keel ViT: [Attention, FeedForward] x depth), each sub-layer then counts as a block."""
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        p = _period([type(c) for c in m])
        if p is None or (p > 1 and not any(heads_of(c) for c in list(m)[:p])):
            continue
        if not isinstance(m[0], (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.GELU, nn.Dropout, nn.Identity)):
            out.append((n, m))
    return out


class _Probe(nn.Module):
    """Stands in for a layer during the probe forward: records that it was called, and any read of its weight or
    bias from outside (torch's TransformerEncoderLayer checks linear1.weight for its fast path, timm Beit reads
    qkv.weight under F.linear): such a layer cannot be replaced by a factorised pair."""

    def __init__(self, layer: nn.Module, name: str, calls: dict, reads: set):
        super().__init__()
        self.layer = layer
        self.__dict__.update(_name=name, _calls=calls, _reads=reads)  # plain attributes, not registered

    def forward(self, *args, **kwargs):
        self._calls.setdefault(self._name, len(self._calls))
        return self.layer(*args, **kwargs)

    def __getattr__(self, key):
        if key in ("weight", "bias"):
            self.__dict__["_reads"].add(self.__dict__["_name"])
            return getattr(self._modules["layer"], key)
        return super().__getattr__(key)


def _called(model: nn.Module, sample: torch.Tensor) -> list[str] | None:
    """Names of the plain Linear / Conv2d modules called in a forward, in call order, less those whose weight a
    parent reads (see _Probe). None when the probe forward fails."""
    calls, reads = {}, set()
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    for n, m in layers:
        set_module(model, n, _Probe(m, n, calls, reads))
    try:
        with torch.no_grad():
            model.forward(sample)  # one image; the model's own hooks are not a forward of its logits
    except Exception:  # noqa: BLE001 - a model that needs other inputs: no layer is listed, passes say so
        return None
    finally:
        for n, m in layers:
            set_module(model, n, m)
    return [n for n in sorted(calls, key=calls.get) if n not in reads]


def structural_layers(model: nn.Module, sample: torch.Tensor) -> list[tuple[str, str]]:
    """Every plain Linear / Conv2d the forward calls, by kind, from structure alone: attn (inside a module named
    like attention or holding a head count), mlp (other Linears inside repeated blocks), stem (convs called
    before any repeated block, or the first conv of a model without), conv (other convs), head (the last layer
    called, a Linear or 1x1 conv).
    Linears outside the blocks other than the head are left out (a pre-logits layer, a pooling query)."""
    called = _called(model, sample)
    if not called:
        return []
    blocks = [n for n, _ in _block_lists(model)]
    heads = {n for n, m in model.named_modules() if n and heads_of(m)}
    inside = {n: any(n.startswith(b + ".") for b in blocks if b) for n in called}
    first_block = next((i for i, n in enumerate(called) if inside[n]), len(called))
    last = model.get_submodule(called[-1])
    head = called[-1] if isinstance(last, nn.Linear) or last.kernel_size == (1, 1) else None
    out = []
    for i, n in enumerate(called):
        m = model.get_submodule(n)
        if n == head:
            kind = "head"
        elif _ATTN.search(n) or any(n.startswith(h + ".") for h in heads):
            kind = "attn" if isinstance(m, nn.Linear) else "conv"
        elif isinstance(m, nn.Conv2d):
            # no repeated blocks (a flat CNN): only the conv on the input is the stem
            kind = "stem" if (i < first_block if first_block < len(called) else i == 0) else "conv"
        else:
            kind = "mlp" if inside[n] else None
        if kind is not None:
            out.append((n, kind))
    return out


def _in_chans(model: nn.Module) -> int | None:
    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), None)


class GenericAdapter:
    """The adapter of a model no family recognises: export, distillation, verify and lowrank work on it."""

    name = "generic"
    family = "other"

    def matches(self, model: nn.Module) -> bool:
        return True

    def vit_blocks(self, model: nn.Module):
        """The longest list of pre-norm transformer blocks, mapped to ViTBlock in place by structure and checked
        numerically (vit_struct.py); InputError saying why not, with the module types, otherwise."""
        try:
            return map_blocks(model, _block_lists(model), self._size(model))
        except InputError as e:
            raise InputError(f"no transformer blocks mapped: {e} (module types: {module_types(model)}); lowrank works "
                             "on any model's plain Linear/Conv2d layers") from None

    def res_blocks(self, model: nn.Module):
        raise InputError(f"no residual conv blocks recognised (module types: {module_types(model)})")

    def layers(self, model: nn.Module) -> list[tuple[str, str]]:
        """`structural_layers` on a zero image of the model's input size (64 px where any size works)."""
        p = next(model.parameters(), None)
        return structural_layers(model, torch.zeros((1, *self._size(model)), dtype=p.dtype if p is not None else torch.float32))

    def _size(self, model: nn.Module) -> tuple[int, int, int]:
        return self.input_size(model) or (_in_chans(model) or 3, 64, 64)

    def feature_modules(self, model: nn.Module) -> list[nn.Module]:
        """The blocks of the longest repeated list (distillation matches their outputs)."""
        lists = _block_lists(model)
        return list(max(lists, key=lambda x: len(x[1]))[1]) if lists else []

    def input_size(self, model: nn.Module):
        """A patch embedding's fixed image size (timm `patch_embed.img_size`), else None: any size works."""
        chans = _in_chans(model) or 3
        for m in model.modules():
            size = getattr(m, "img_size", None)
            if isinstance(size, int):
                return (chans, size, size)
            if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
                return (chans, *size)
        return None

    def describe(self, model: nn.Module) -> dict:
        lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
        lists = _block_lists(model)
        info = {"blocks": max((len(m) for _, m in lists), default=0), "module_types": module_types(model),
                "num_classes": getattr(model, "num_classes", lin[-1].out_features if lin else None)}
        longest = max(lists, key=lambda x: len(x[1]))[1] if lists else []
        if longest and all(isinstance(b, ViTBlock) for b in longest):  # mapped by vit_blocks: what the passes cost
            info.update(geometry(model, list(longest), self._size(model)))
        return info
