"""Memory the run will need, estimated on the meta device (nothing allocated), checked before the real work."""
from __future__ import annotations

import copy
import ctypes
import gc

import torch
from torch import nn

from .errors import InputError
from .rsslog import rss as resident


def activation_bytes(model: nn.Module, input_size) -> tuple[int, int] | None:
    """(largest, total) bytes of the leaf modules' outputs for one image; None when the model cannot run on meta."""
    sizes: list[int] = []

    def hook(_m, _a, out):
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    try:
        memo = {id(t): torch.empty_like(t, device="meta") for t in [*model.parameters(), *model.buffers()]}
        memo = {k: nn.Parameter(v, requires_grad=False) if k in {id(p) for p in model.parameters()} else v
                for k, v in memo.items()}
        meta = copy.deepcopy(model, memo)  # the weights are never copied: meta tensors stand in for them
        hooks = [m.register_forward_hook(hook) for m in meta.modules() if not list(m.children())]
        with torch.no_grad():
            meta(torch.empty((1, *input_size), device="meta"))
    except Exception:  # noqa: BLE001 - an estimate only: a model that needs real data skips it
        return None
    for h in hooks:
        h.remove()
    return (max(sizes, default=0), sum(sizes))


def available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable")
    except (OSError, ValueError, IndexError):
        return None


def check_memory(model: nn.Module, input_size, *, calib_images: int, train_batch: int | None) -> dict | None:
    """Refuse, in one line, a run whose activations cannot fit in free memory (e.g. an absurd input side)."""
    got = activation_bytes(model, input_size)
    free = available_bytes()
    if got is None or free is None:
        return None
    largest, total = got
    need = {"calibration": 3 * largest * calib_images}  # inference keeps a few activations alive at once
    if train_batch:
        need["distillation"] = 2 * total * train_batch  # training keeps every activation for the backward pass
    what, peak = max(need.items(), key=lambda kv: kv[1])
    if peak > free:
        side = "x".join(map(str, input_size[1:]))
        raise InputError(f"the {what} would need about {peak / 2**30:.1f} GiB for activations at input {side} "
                         f"(estimated before allocating), {free / 2**30:.1f} GiB are free; lower the input size, "
                         f"calibration.images or distill.batch_size")
    return {"estimate_gib": round(peak / 2**30, 3), "for": what, "free_gib": round(free / 2**30, 1)}


RELEASE_ABOVE = 1 << 30  # below this RSS a release gives back little and its gc pass costs ~0.2 s (the planner ran 66)


def release() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc). ONNX protobufs, onnxruntime sessions
    and per-layer statistics free many blocks below the mmap threshold; without a trim they stay in RSS and
    each later stage piles on top of them. A small process (under RELEASE_ABOVE) skips it."""
    rss = resident()
    if rss is not None and rss < RELEASE_ABOVE:
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
