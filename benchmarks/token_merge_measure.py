"""Issue 42's measurement on the shared ViT (a script, not a test; no training): at ~50% of the FLOPs, the
onnxruntime latency of the teacher, token_merge, the same network on its first N tokens (built by hand: the
reference) and width, timed interleaved in one run; and top-1 on CIFAR-10 test images without distillation.

    python -m benchmarks.token_merge_measure [--share 0.5] [--images 2000] [--batch 8] [--threads 2] [--runs 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
from pathlib import Path

import torch

from benchmarks import contenders  # noqa: F401 (registers bench_token_keep)
from benchmarks.bench import SHARED
from compress.core.registry import PassContext, get_pass
from compress.export.write import write_onnx
from compress.load.data import calibration_batch, dataset
from compress.load.model import load
from compress.measure.metrics import count_flops
from compress.planner.search import latency, width_candidates
from compress.recipe import parse_recipe


def build(loaded, passes: list, calib):
    model = copy.deepcopy(loaded.model)
    for step in parse_recipe({"version": 1, "passes": passes}).steps:
        model = get_pass(step.name).fn(model, loaded.adapter, step.config, PassContext(calib)).model.eval()
    return model


@torch.no_grad()
def top1(models: dict, data, n: int) -> dict:
    """Top-1 on n seeded test images (a class-sorted folder's first n would be two classes)."""
    hits = {k: 0 for k in models}
    seen = 0
    pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:n].tolist()
    for i in range(0, len(pick), 100):
        items = [data[j] for j in pick[i:i + 100]]
        x, y = torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])
        for k, m in models.items():
            hits[k] += int((m(x).argmax(-1) == y).sum())
        seen += len(y)
    return {k: v / seen for k, v in hits.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="JSON result (default: printed only)")
    a = ap.parse_args(argv)
    loaded = load(str(SHARED / "models" / "vit_cifar10"))
    size = tuple(loaded.data_cfg["input_size"])
    calib, _ = calibration_batch(str(SHARED / "cifar10" / "train.zip"), loaded.data_cfg, 32, 0)
    f0 = count_flops(loaded.model, size)
    recipes = {"token_merge": [{"token_merge": {"target": a.share}}],
               "reference": [{"bench_token_keep": {"flops_ratio": a.share}}],
               "width": [width_candidates(a.share, "vit", "flops")[0]]}
    models = {"teacher": loaded.model, **{k: build(loaded, p, calib) for k, p in recipes.items()}}
    res = {"share": a.share, "batch": a.batch, "threads": a.threads, "runs": a.runs,
           "load_average": os.getloadavg(), "cpus": os.cpu_count(), "models": {}}
    tm = models["token_merge"]
    res["token_merge_r"] = [b.r for b in tm.blocks]
    with tempfile.TemporaryDirectory(prefix="tome-measure-") as tmp:
        paths = {}
        for k, m in models.items():
            paths[k] = Path(tmp) / f"{k}.onnx"
            write_onnx(m, paths[k], calib[:8], opset=18, dynamic_batch=True, tol=1e-4, slim=True)
        lat = latency(paths, size, batch_sizes=[a.batch], threads=a.threads, warmup=5, runs=a.runs)
    t_ms = lat["teacher"][str(a.batch)]["p50_ms"]
    acc = top1({k: v for k, v in models.items() if k != "reference"},
               dataset(str(SHARED / "cifar10" / "test.zip"), loaded.data_cfg), a.images)
    for k, m in models.items():
        flops = count_flops(m, size) / f0
        ms = lat[k][str(a.batch)]["p50_ms"]
        speed = t_ms / ms
        res["models"][k] = {"flops_ratio": flops, "p50_ms": ms, "speedup": speed,
                            "efficiency": speed * flops, "top1": acc.get(k)}
    ref = res["models"]["reference"]["efficiency"]
    for k, v in res["models"].items():
        v["of_reference_efficiency"] = v["efficiency"] / ref
    res["load_average_after"] = os.getloadavg()
    print(json.dumps(res, indent=1))
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
