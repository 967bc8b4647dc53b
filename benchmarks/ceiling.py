"""Latency ceilings of a narrower dense network (issue #15): hand-built half-width models against the `width` pass.

For each shared teacher, four files through the same exporter (`write_onnx`, opset 18, onnxslim), timed together
(interleaved, onnxruntime CPU) at batch 1 and 8, at 1 and 2 threads:
  timm teacher       the architecture as timm builds it (fused qkv, timm's attention and MLP)
  timm half          the same, built narrower by hand: ViT MLP hidden and head dims halved (timm's `attn_head_dim`);
                     ResNet bottleneck width halved (`base_width` 32)
  teacher            the teacher as `compress` loads it (ViT blocks as `ViTBlock`: separate q, k, v)
  width keep 0.5     the `width` pass keeping half of every width (`keep: 0.5`, multiples of 8)
speedup ÷ FLOP cut = (teacher p50 / file p50) ÷ (teacher FLOPs / file FLOPs), each against its own teacher (timm
half against timm teacher, width against the loaded teacher). Latency does not depend on weight values: the hand-built
file has random weights (its Linear biases made non-zero, as a trained model's are: an Add of zeros is folded away at
export); the others are the shared teachers' own weights.

ImageNet-size timm architectures (`--archs`, 224 px, the scaling table's models) get the same treatment with random
weights: timm teacher, timm half and `width keep 0.5` of that teacher, all against the timm teacher.

    python -m benchmarks.ceiling [--runs 50] [--threads 1,2] [--archs vit_small_patch16_224,resnet50] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import onnxruntime
import timm
import torch
from torch import nn

from compress.adapters import detect
from compress.export.write import write_onnx
from compress.load.model import Loaded, load
from compress.measure.metrics import count_flops, latency
from compress.run.pipeline import rewrite
from compress.recipe import parse_recipe
from compress.report.write import machine_info

from . import nonzero_biases  # not via .scaling: that registers the bench-only passes

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"
WARMUP = 10  # untimed runs per file before the timed ones (the rendered text names it)


def _timm(path: Path | str, half: bool) -> nn.Module:
    """A shared teacher's timm model (its own weights unless `half`), or an architecture name with random weights."""
    if isinstance(path, Path):
        cfg = json.loads((path / "config.json").read_text())
    else:
        cfg = {"architecture": path, "num_classes": 1000}
    args = dict(cfg.get("model_args", {}))
    if half and "resnet" in cfg["architecture"]:
        args["base_width"] = 32  # Bottleneck width = planes * base_width / 64: the inner channels halved
    torch.manual_seed(0)
    model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=cfg["num_classes"], **args).eval()
    if not half:  # a shared teacher's own weights; an architecture's random ones
        if isinstance(path, Path):
            from safetensors.torch import load_file

            model.load_state_dict(load_file(path / "model.safetensors"))
        return model
    if hasattr(model, "blocks"):
        from timm.layers import Attention, Mlp

        for b in model.blocks:
            a, m = b.attn, b.mlp
            dim, heads = a.qkv.in_features, a.num_heads
            b.attn = Attention(dim, heads, qkv_bias=a.qkv.bias is not None, attn_head_dim=a.head_dim // 2).eval()
            b.mlp = Mlp(dim, m.fc1.out_features // 2, act_layer=type(m.act)).eval()
    return nonzero_biases(model)


def _width(loaded, keep: float, images: int = 64) -> nn.Module:
    calib = torch.randn(images, *loaded.data_cfg["input_size"], generator=torch.Generator().manual_seed(0))
    recipe = parse_recipe({"version": 1, "passes": [{"width": {"keep": keep}}]})
    return rewrite(loaded, recipe, calib, log=lambda _m: None)[0]  # a copy: loaded.model stays the teacher


def run_teacher(path: Path | str, work: Path, runs: int, threads: list[int]) -> dict:
    """A shared teacher (a Path) or a timm architecture at 224 with random weights (a name)."""
    if isinstance(path, Path):
        loaded = load(str(path))
        models = {"timm teacher": _timm(path, False), "timm half": _timm(path, True), "teacher": loaded.model,
                  "width keep 0.5": _width(loaded, 0.5)}
        ref = {"timm teacher": "timm teacher", "timm half": "timm teacher", "teacher": "teacher",
               "width keep 0.5": "teacher"}
    else:  # the width file is cut from the timm teacher itself, so both compare against it
        teacher = nonzero_biases(_timm(path, False))
        loaded = Loaded(teacher, detect(teacher), {"input_size": (3, 224, 224)}, {"arch": path})  # rewrite copies
        models = {"timm teacher": teacher, "timm half": _timm(path, True), "width keep 0.5": _width(loaded, 0.5, 8)}
        ref = dict.fromkeys(models, "timm teacher")
    size = tuple(loaded.data_cfg["input_size"])
    x = torch.randn(2, *size)
    files, flops = {}, {}
    for name, m in models.items():
        files[name] = work / f"{Path(path).name}-{name.replace(' ', '_')}.onnx"
        write_onnx(m, files[name], x, opset=18, dynamic_batch=True, tol=1e-3, slim=True)
        flops[name] = count_flops(m, size)
    out = {"input_size": list(size), "flops": flops, "threads": {}}
    for th in threads:
        lat = latency(files, size, batch_sizes=[1, 8], threads=th, warmup=WARMUP, runs=runs)
        rows = {}
        for name in files:
            cut = flops[ref[name]] / flops[name]
            rows[name] = {bs: {"p50_ms": round(lat[name][bs]["p50_ms"], 3),
                               "speedup": round(lat[ref[name]][bs]["p50_ms"] / lat[name][bs]["p50_ms"], 3),
                               "per_cut": round(lat[ref[name]][bs]["p50_ms"] / lat[name][bs]["p50_ms"] / cut, 3)}
                          for bs in lat[name]}
        out["threads"][str(th)] = rows
    return out


def render(res: dict) -> str:
    m = res["machine"]
    lines = [f"{m['cpu']}, {m['cores']} cores; onnxruntime {res['onnxruntime']}, torch {res['torch']}; "
             f"{res['runs']} runs after {WARMUP} warm-ups, interleaved, p50; load average {res['load_at_start']} at the "
             f"start, {res['load_at_end']} at the end; {res['total_s']:.0f} s.", ""]
    for t, r in res["teachers"].items():
        lines += [f"**{t}** (input {'x'.join(map(str, r['input_size']))})", "",
                  "| file | FLOPs | threads | p50 ms b1 | p50 ms b8 | speedup b1 / ÷cut | speedup b8 / ÷cut |",
                  "|---|---|---|---|---|---|---|"]
        for th, rows in r["threads"].items():
            for name, v in rows.items():
                lines.append(f"| {name} | {r['flops'][name] / 1e6:.1f}M | {th} | {v['1']['p50_ms']:.2f} | "
                             f"{v['8']['p50_ms']:.2f} | {v['1']['speedup']:.2f}x / {v['1']['per_cut']:.2f} | "
                             f"{v['8']['speedup']:.2f}x / {v['8']['per_cut']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--teachers", default="vit_cifar10,resnet26_cifar10")
    ap.add_argument("--archs", default="", help="timm architectures at 224 px with random weights, comma-separated")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ceiling")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"machine": machine_info(None), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "runs": a.runs, "load_at_start": [round(v, 2) for v in os.getloadavg()], "teachers": {}}
    with tempfile.TemporaryDirectory(prefix="compress-ceiling-") as tmp:
        threads = [int(x) for x in a.threads.split(",")]
        for t in filter(None, a.teachers.split(",")):
            res["teachers"][t] = run_teacher(MODELS / t, Path(tmp), a.runs, threads)
        for arch in filter(None, a.archs.split(",")):
            res["teachers"][arch] = run_teacher(arch, Path(tmp), a.runs, threads)
    res["load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    res["total_s"] = round(time.perf_counter() - t0, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ceiling.json").write_text(json.dumps(res, indent=1))
    (a.out / "ceiling.md").write_text(render(res) + "\n")
    print(render(res))
    return res


if __name__ == "__main__":
    main()
