"""Measurements used by the report and the tests: params, FLOPs, logit fidelity, ORT latency, top-1."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..core.diskio import writing
from ..core.locks import scratch_dir
from . import ort_timing


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared parameters count once


def count_flops(model: nn.Module, input_size) -> int:
    """FLOPs of one image (a multiply-add counts 2), via torch.utils.flop_counter.

    Counted on the meta device (shapes only: no arithmetic, no weight copy); a model whose forward
    needs real values (a plain tensor attribute, a data-dependent branch) is counted for real.
    The math SDPA backend is forced so fused attention kernels are counted too (the
    flop counter has no formula for the CPU flash kernel and would skip attention).
    """
    try:
        return _count_flops(model, input_size, meta=True)
    except Exception:  # noqa: BLE001 - any failure on meta tensors: count on real ones
        return _count_flops(model, input_size, meta=False)


def _count_flops(model: nn.Module, input_size, *, meta: bool) -> int:
    x = torch.zeros((1, *input_size), device="meta" if meta else "cpu")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        if meta:
            tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
            torch.func.functional_call(model, {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}, (x,))
        else:
            model(x)
    return int(fc.get_total_flops())


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 logits in eval mode: fidelity of approximate passes needs no more (and no model copy)."""
    return model.eval()(x)


@torch.no_grad()
def logits64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits computed in float64 on a copy, so an exactness check measures the maths, not rounding."""
    m = copy.deepcopy(model).double().eval()
    with sdpa_kernel(SDPBackend.MATH):
        return m(x.double())


def rel_max_diff(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |out - ref| relative to the reference's scale max |ref|: the project's one exactness measure."""
    ref, out = ref.double(), out.double()
    return float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """max |Δlogit| relative to the reference's logit scale, top-1 agreement and KL(ref || out)."""
    ref, out = ref.double(), out.double()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return {"max_abs_diff": float((ref - out).abs().max()), "rel_diff": rel_max_diff(ref, out),
            "agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()), "kl": float(kl)}


ort_session, ort_run, latency = ort_timing.session, ort_timing.run, ort_timing.latency


def latency_child(paths: dict[str, str], input_size, *, batch_sizes, threads: int, warmup: int, runs: int,
                  seed: int = 0) -> dict:
    """`latency` in a fresh interpreter that imports only onnxruntime and numpy: its sessions never add to this
    process's models, and this process's freed memory is not theirs either (ViT-L: teacher and student sessions
    are 1.5x the weights)."""
    spec = {"paths": {k: str(p) for k, p in paths.items()}, "input_size": list(input_size), "batch_sizes": list(batch_sizes),
            "threads": threads, "warmup": warmup, "runs": runs, "seed": seed}
    with scratch_dir("compress-timing-") as folder:  # swept by a later run if this one is killed
        with writing("the timing spec", folder):
            (folder / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-I", ort_timing.__file__, str(folder / "spec.json")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the onnxruntime timing process failed (exit {proc.returncode}): "
                           f"{(proc.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(proc.stdout)


def ort_predictor(path, dynamic_batch: bool, threads: int = 2):
    """An ONNX file as a function from an image batch to logits (row by row for a fixed batch of 1)."""
    session = ort_session(path, threads)

    def predict(x: torch.Tensor) -> torch.Tensor:
        rows = [x] if dynamic_batch else list(x.split(1))
        return torch.cat([torch.from_numpy(ort_run(session, r.numpy())) for r in rows])

    return predict


@torch.no_grad()
def evaluate(models: dict, dl) -> dict:
    """Top-1 of every model (when labeled) and its top-1 agreement with models['teacher'], in one pass; each top-1
    and each drop from the teacher with its paired 95% interval over the images (stats.py)."""
    from .stats import drop_interval, top1_interval

    n = skipped = 0
    first = None  # the first unreadable image's name, for the warning
    right: dict[str, list] = {k: [] for k in models}
    agree = {k: 0 for k in models}
    for x, y, bad in dl:
        skipped += len(bad)
        first = first or (bad[0] if bad else None)
        if x is None:
            continue
        preds = {k: m(x).argmax(-1) for k, m in models.items()}
        n += len(y)
        for k, p in preds.items():
            right[k].append(p == y)
            agree[k] += int((p == preds["teacher"]).sum())
    named = {"first_unreadable": first} if first else {}
    if n == 0:
        return {"images": 0, "skipped": skipped, **named}
    out = {"images": n, "skipped": skipped, **named, "agreement": agree["student"] / n}
    hits = {k: torch.cat(v).numpy() for k, v in right.items()}
    if dl.dataset.labeled:
        out.update(teacher_top1=float(hits["teacher"].mean()), student_top1=float(hits["student"].mean()),
                   intervals={k: {"top1": top1_interval(h), **({"drop": drop_interval(hits["teacher"], h)}
                                                             if k != "teacher" else {})} for k, h in hits.items()})
    out["variants"] = {k: {"agreement": agree[k] / n, **({"top1": float(hits[k].mean())} if dl.dataset.labeled else {})}
                       for k in models if k not in ("teacher", "student")}
    return out
