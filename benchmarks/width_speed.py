"""Is width's file as fast as the same network built narrower by hand? (issue #43's speed table)

For each network (224 px, random weights, biases drawn non-zero as a trained network's are, 1000 classes): the
teacher, `width: {target: 0.5, scope: model}` through the CLI, and a reference built narrower by the network's own
constructor (torchvision `width_mult`, narrower stage widths; the multiplier bisected to width's FLOP share), all three
exported by the same `compress apply` path and timed in one onnxruntime process, interleaved, batch 8, 2 threads.
Efficiency = speedup / (teacher FLOPs / file FLOPs); the figure of merit is width's efficiency over the reference's,
so a host whose CPU turns FLOP cuts into less speed judges both alike.

    python -m benchmarks.width_speed [--only NAME,...] [--runs N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PX, CLASSES = 224, 1000


def _div8(c: float) -> int:
    return max(8, int(round(c / 8)) * 8)


def resnetv2_50(narrow: float = 1.0):
    import timm

    ch = tuple(_div8(c * narrow) for c in (256, 512, 1024, 2048))
    return timm.create_model("resnetv2_50", num_classes=CLASSES, channels=ch, stem_chs=_div8(64 * narrow))


def resnext50_32x4d(narrow: float = 1.0):
    import timm

    # timm's: its `channels` narrow every stage (torchvision's ResNet fixes them; its width_per_group only the inner)
    return timm.create_model("resnext50_32x4d", num_classes=CLASSES, channels=tuple(_div8(c * narrow) for c in (64, 128, 256, 512)))


def mobilenet_v2(narrow: float = 1.0):
    from torchvision.models import mobilenet_v2 as build

    return build(width_mult=narrow, num_classes=CLASSES)


def efficientnet_b0(narrow: float = 1.0):
    from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

    setting, last = _efficientnet_conf("efficientnet_b0", width_mult=narrow, depth_mult=1.0)
    return EfficientNet(setting, dropout=0.2, last_channel=last, num_classes=CLASSES)


def regnet_y_800mf(narrow: float = 1.0):
    from torchvision.models.regnet import BlockParams, RegNet

    p = BlockParams.from_init_params(depth=14, w_0=_div8(56 * narrow), w_a=38.84 * narrow, w_m=2.4, group_width=16,
                                     se_ratio=0.25)
    return RegNet(p, num_classes=CLASSES)


def convnext_tiny(narrow: float = 1.0):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    c = [_div8(x * narrow) for x in (96, 192, 384, 768)]
    setting = [CNBlockConfig(c[0], c[1], 3), CNBlockConfig(c[1], c[2], 3), CNBlockConfig(c[2], c[3], 9),
               CNBlockConfig(c[3], None, 3)]
    return ConvNeXt(setting, stochastic_depth_prob=0.0, num_classes=CLASSES)


NETS = ["resnetv2_50", "resnext50_32x4d", "mobilenet_v2", "efficientnet_b0", "regnet_y_800mf", "convnext_tiny"]


def _checkpoint(name: str, narrow: float, folder: Path) -> Path:
    import torch
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(0)
    model = globals()[name](narrow).eval()
    # constructors zero every bias and onnxruntime drops an Add of zeros, while width's refit fits biases; a trained
    # network's are not zero (ConvNeXt, whose Linears carry biases: 0.87 against zero biases, 0.98 against drawn ones)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "bias", None), torch.Tensor) and not isinstance(m, nn.modules.batchnorm._NormBase):
                m.bias.normal_(0, 0.02)
    path = folder / f"{name}-{narrow}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _apply(name: str, narrow: float, passes: str, folder: Path, tag: str) -> dict:
    """One `compress apply` as a user runs it: the network through module:factory, random calibration (random
    weights: there is nothing to calibrate on), ONNX only, no report timing (this script times all three)."""
    ckpt = _checkpoint(name, narrow, folder)
    recipe = folder / f"{tag}.yaml"
    recipe.write_text(f"version: 1\nmodel: {{arch: 'benchmarks.width_speed:{name}', kwargs: {{narrow: {narrow}}}, "
                      f"img_size: {PX}}}\npasses: {passes}\ncalibration: {{data: random, images: 16}}\n"
                      "export: {formats: [onnx]}\nreport: {latency: null}\n")
    out = folder / tag
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compress", "apply", str(recipe), str(ckpt), "-o", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: exit {proc.returncode}: {(proc.stdout + proc.stderr).strip().splitlines()[-1]}")
    rep = json.loads((out / "report.json").read_text())
    return {"onnx": str(out / "model.onnx"), "flops": rep["summary"]["flops"]["student"],
            "params": rep["summary"]["params"]["student"], "seconds": round(time.perf_counter() - t0, 1)}


def _multiplier(name: str, flops: float) -> float:
    """The constructor's width multiplier whose network has about `flops` (bisection: FLOPs grow with it; the
    constructors round widths, so the share lands near, not on, width's)."""
    from compress.measure.metrics import count_flops

    lo, hi, best = 0.3, 1.0, (float("inf"), 1.0)
    for _ in range(6):
        mid = round((lo + hi) / 2, 4)
        f = count_flops(globals()[name](mid).eval(), (3, PX, PX))
        best = min(best, (abs(f - flops), mid))
        lo, hi = (mid, hi) if f < flops else (lo, mid)
    return best[1]


def measure(name: str, runs: int, log=print) -> dict:
    from compress.measure.metrics import latency_child

    with tempfile.TemporaryDirectory(prefix=f"width-speed-{name}-") as tmp:
        folder = Path(tmp)
        files = {"teacher": _apply(name, 1.0, "[]", folder, "teacher"),
                 "width": _apply(name, 1.0, "[{width: {target: 0.5, scope: model}}]", folder, "width")}
        narrow = _multiplier(name, files["width"]["flops"])
        files["reference"] = _apply(name, narrow, "[]", folder, "reference")
        took = ", ".join(f"{k} {v['seconds']} s" for k, v in files.items())
        log(f"{name}: built and exported ({took})")
        timed = latency_child({k: v["onnx"] for k, v in files.items()}, (3, PX, PX), batch_sizes=[8], threads=2,
                              warmup=5, runs=runs)
    row = {"model": name, "teacher_flops": files["teacher"]["flops"], "reference_multiplier": narrow}
    for k in ("width", "reference"):
        cut = files["teacher"]["flops"] / files[k]["flops"]
        speed = timed["teacher"]["8"]["p50_ms"] / timed[k]["8"]["p50_ms"]
        row[k] = {"flops_share": 1 / cut, "p50_ms": timed[k]["8"]["p50_ms"], "speedup": speed, "efficiency": speed / cut,
                  "convert_s": files[k]["seconds"]}
    row["teacher_p50_ms"] = timed["teacher"]["8"]["p50_ms"]
    row["ratio"] = row["width"]["efficiency"] / row["reference"]["efficiency"]
    log(json.dumps(row))
    return row


def table(rows: list[dict]) -> str:
    lines = ["| network | teacher b8 p50 | width: FLOP share, speedup, efficiency | reference: FLOP share, speedup, "
             "efficiency | width / reference |", "|---|---|---|---|---|"]
    for r in rows:
        w, h = r["width"], r["reference"]
        lines.append(f"| {r['model']} | {r['teacher_p50_ms']:.1f} ms | {w['flops_share']:.3f}, {w['speedup']:.2f}x, "
                     f"{w['efficiency']:.2f} | {h['flops_share']:.3f}, {h['speedup']:.2f}x, {h['efficiency']:.2f} | "
                     f"**{r['ratio']:.2f}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated network names")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = [n for n in NETS if not args.only or n in args.only.split(",")]
    t0, load0 = time.time(), os.getloadavg()[0]
    rows = [measure(n, args.runs) for n in names]
    import onnxruntime
    import torch

    result = {"rows": rows, "runs": args.runs, "batch": 8, "threads": 2, "px": PX,
              "load_average_start": load0, "load_average_end": os.getloadavg()[0], "seconds": round(time.time() - t0),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "complete": len(rows) == len(NETS)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "width_speed.json").write_text(json.dumps(result, indent=1))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
    md = (f"`python -m benchmarks.width_speed --runs {args.runs}` on {when}: {result['machine']}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; load average "
          f"{load0:.1f} at the start, {result['load_average_end']:.1f} at the end; {result['seconds']} s. "
          f"Batch 8, 2 threads, {args.runs} interleaved runs, p50; {PX} px, random weights and biases, {CLASSES} classes.\n\n"
          + table(rows) + "\n")
    (args.out / "width_speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
