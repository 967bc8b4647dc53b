"""Scaling table: ImageNet-size timm models with random weights (latency does not depend on the
values), full vs MLP-stripped-half vs low-rank-half vs width-half (multiples of 8, and of 16): FLOPs, params and onnxruntime latency."""
from __future__ import annotations

import time
import traceback
from pathlib import Path

import timm
import torch

from compress.adapters import detect
from compress.export.write import write_onnx
from compress.load.model import Loaded
from compress.measure.metrics import count_flops, count_params, latency
from compress.run.pipeline import rewrite
from compress.planner.search import WIDTH_LAYERS
from compress.recipe import parse_recipe

from . import nonzero_biases
from .contenders import has_lowrank


def variants(loaded: Loaded) -> dict[str, list]:
    out = {"full": []}
    if loaded.adapter.family == "vit":
        n = len(loaded.model.blocks)
        out["mlp-strip-half"] = [{"mlp_strip": {"blocks": list(range(n // 4, n // 4 + n // 2))}}]
    if has_lowrank():
        out["lowrank-half"] = [{"lowrank": {"method": "whitened_svd", "target": 0.5, "allocate": "greedy"}}]
    out["width-half"] = [{"width": {"target": 0.5, "scope": "model", "allocate": "uniform"}}]
    # the same at multiples of 16 over the family's widest layer set (a ResNet's residual widths too): MLAS's GEMM
    # panels are 16 floats wide, and resnet50's speedup ÷ FLOP cut at batch 8 went 0.93 -> 0.97 (-> 0.99 with the
    # residual widths) on a 2-core EPYC (benchmarks/reading.md)
    out["width-half-16"] = [{"width": {"target": 0.5, "scope": "model", "allocate": "uniform", "multiple": 16,
                                       "layers": WIDTH_LAYERS[loaded.adapter.family][-1]}}]
    return out


def run_arch(arch: str, *, runs: int, threads: int, work: Path, log, warmup: int = 10, slim: bool = True) -> dict:
    torch.manual_seed(0)
    model = nonzero_biases(timm.create_model(arch, pretrained=False, num_classes=1000).eval())
    size = (3, 224, 224)
    loaded = Loaded(model, detect(model), {"input_size": size}, {"arch": arch})
    calib = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    rows, files = {}, {}
    for name, passes in variants(loaded).items():
        t0 = time.perf_counter()
        student, _, _, _ = rewrite(loaded, parse_recipe({"version": 1, "passes": passes}), calib, log=lambda _m: None)
        convert = time.perf_counter() - t0
        files[name] = work / f"{arch}-{name}.onnx"
        art = write_onnx(student, files[name], calib[:2], opset=18, dynamic_batch=True, tol=1e-4, slim=slim)
        rows[name] = {"passes": passes, "params": count_params(student), "flops": count_flops(student, size),
                      "onnx_bytes": art["bytes"], "convert_s": round(convert, 2)}
        log(f"  {arch} {name}: {rows[name]['flops'] / 1e9:.2f} GFLOPs, converted in {convert:.1f} s")
    batches = [1, 8]
    lat = latency(files, size, batch_sizes=batches, threads=threads, warmup=warmup, runs=runs)
    for name, r in rows.items():
        r["latency"] = lat[name]
        r["flops_ratio"] = r["flops"] / rows["full"]["flops"]
        for bs in lat[name]:
            r["latency"][bs]["speedup"] = lat["full"][bs]["p50_ms"] / lat[name][bs]["p50_ms"]
    for f in files.values():
        f.unlink(missing_ok=True)
    return {"arch": arch, "input_size": list(size), "batch_sizes": batches, "runs": runs, "warmup": warmup,
            "variants": rows}


def run(archs: list[str], *, runs: int, threads: int, work: Path, log, warmup: int = 10, slim: bool = True) -> list[dict]:
    out = []
    for arch in archs:
        try:
            out.append(run_arch(arch, runs=runs, threads=threads, work=work, log=log, warmup=warmup, slim=slim))
        except Exception as e:  # noqa: BLE001 - recorded in the table, and fails the run
            log(f"  {arch} FAILED: {type(e).__name__}: {e}")
            out.append({"arch": arch, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)})
    return out
