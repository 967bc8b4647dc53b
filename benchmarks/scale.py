"""Conversion cost at scale: `compress apply` (lowrank target 0.5) on ImageNet-size timm ViTs with random
weights, each in a child process: seconds per stage (from its report.json), wall (and wall without the latency
timing), and peak RSS measured from outside: the larger of the process tree's summed RSS polled every 50 ms (the
latency child counts with its parent) and the converter's exact own peak (wait4's ru_maxrss); an upper bound
(the sum of each process's own peak) beside it. --rss-log DIR writes each stage's exact in-process peak too.

    python -m benchmarks.scale [--models vit_base_patch16_224,...] [--latency|--no-latency] [--quick] [--rss-log DIR]
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

from benchmarks import child_env

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = "vit_base_patch16_224,vit_large_patch16_224,vit_huge_patch14_224"
RECIPE = "version: 1\npasses:\n  - lowrank: {target: 0.5}\ncalibration: {data: random}\nreport: {latency: %s}\n"  # random weights: random inputs, asked for
POLL_S = 0.05


def build(arch: str, folder: Path, model_args: dict) -> Path:
    """Random weights as a timm directory (config.json + model.safetensors), built in a child process
    so its memory is not counted in (and not shared with) the conversion."""
    code = ("import json, sys, timm, torch; from safetensors.torch import save_file; torch.manual_seed(0); "
            f"m = timm.create_model({arch!r}, pretrained=False, **{model_args!r}); "
            f"save_file({{k: v.contiguous() for k, v in m.state_dict().items()}}, {str(folder / 'model.safetensors')!r}); "
            f"args = {{k: v for k, v in {model_args!r}.items() if k != 'num_classes'}}; "
            f"open({str(folder / 'config.json')!r}, 'w').write(json.dumps({{'architecture': {arch!r}, "
            f"'num_classes': {model_args.get('num_classes', 1000)}, 'model_args': args}}))")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder


PF_FORKNOEXEC = 0x40  # /proc/PID/stat flags: forked, not yet exec'd (a vfork child shares its parent's memory)


def _tree(root: int, hwm: dict) -> int:
    """Summed VmRSS of `root` and its descendants (found through /proc/PID/task/*/children); records each process's
    high-water mark (VmHWM) in `hwm`. A process between fork and exec is not summed: it shares its parent's pages."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat") as f:
                flags = int(f.read().rsplit(")", 1)[1].split()[6])
            with open(f"/proc/{pid}/status") as f:
                got = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}
            if not flags & PF_FORKNOEXEC:
                total += got.get("VmRSS", 0)
                hwm[pid] = max(hwm.get(pid, 0), got.get("VmHWM", 0))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError, IndexError):  # the process ended between the reads
            continue
    return total


def _tree_rss(root: int) -> int:
    return _tree(root, {})


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[int, str, str, float, dict]:
    """(exit code, stdout, stderr, wall s, memory). Memory: `tree_sampled` the peak of the process tree's summed RSS
    polled every 50 ms (misses spikes shorter than that), `max_process` the converter's exact peak (wait4's
    ru_maxrss: its own or a waited-for child's, the largest), `peak` the larger of the two (a lower bound of the
    tree's true peak) and `upper` the sum of every process's own peak (an upper bound: they peak at different times)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        tree, hwm = 0, {}
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            tree = max(tree, _tree(proc.pid, hwm))
            time.sleep(POLL_S)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        single = usage.ru_maxrss * 1024
        hwm[proc.pid] = max(hwm.get(proc.pid, 0), single)
        mem = {"peak": max(tree, single), "tree_sampled": tree, "max_process": single, "upper": sum(hwm.values())}
        return proc.returncode, out.read(), err.read(), wall, mem


def convert(folder: Path, recipe: Path, out: Path, rss_log: Path | None = None, profile: Path | None = None) -> dict:
    prof = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *prof, "-m", "compress", "apply", str(recipe), str(folder), "-o", str(out), "--overwrite", "--json"]
    env = child_env({"COMPRESS_RSS_LOG": str(rss_log)} if rss_log else None)
    rc, stdout, stderr, wall, mem = run_measured(cmd, env)
    if rss_log and rss_log.exists():  # the log resets the kernel's high-water mark at each stage: its stages hold the peak
        logged = [json.loads(line)["peak_gb"] * 1e9 for line in rss_log.read_text().splitlines()]
        mem["max_process"] = max([mem["max_process"], *logged])
        mem["peak"] = max(mem["peak"], mem["max_process"])
    rss = {"peak_rss_bytes": mem["peak"], "tree_rss_sampled_bytes": mem["tree_sampled"],
           "max_process_rss_bytes": mem["max_process"], "rss_upper_bound_bytes": mem["upper"]}
    if rc != 0:
        return {"ok": False, "exit_code": rc, "error": stderr.strip().splitlines()[-1:], "wall_s": round(wall, 1), **rss}
    rep = json.loads(stdout)
    weights = (folder / "model.safetensors").stat().st_size
    onnx = rep["artifacts"]["onnx"]
    return {"ok": True, "params": rep["summary"]["params"]["teacher"], "weights_bytes": weights,
            "stages_s": rep["stages_s"], "wall_s": round(wall, 1),
            "wall_excl_latency_s": round(wall - rep["stages_s"].get("latency", 0.0), 1), **rss,
            "peak_rss_x_weights": round(mem["peak"] / weights, 2), "flops_ratio": rep["summary"]["flops"]["ratio"],
            "onnx_bytes": onnx["bytes"], "onnx_files": onnx.get("files", [onnx["path"]]),
            "onnx_parity_rel": onnx["parity"]["rel_diff"],
            "latency_b1": (rep["summary"].get("latency") or {}).get("1")}


def markdown(res: dict) -> str:
    lines = ["## Conversion at scale (`python -m benchmarks.scale`)", "",
             f"`compress apply` with `lowrank: {{target: 0.5}}`, report.latency {res['latency']}, random weights, "
             f"one child process per model; peak RSS from outside: the larger of its process tree's summed RSS (polled "
             f"every 50 ms) and its own exact peak. {res['machine']}; load average {res.get('load_at_start')} at the start, "
             f"{res.get('load_at_end')} at the end.", "",
             "| model | params | weights | load s | rewrite s | export s | measure s | latency s | wall s "
             "| wall s w/o latency | peak RSS | × weights | ONNX |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch, r in res["models"].items():
        if not r["ok"]:
            lines.append(f"| {arch} | failed (exit {r['exit_code']}): {r['error']} | | | | | | | {r['wall_s']} | "
                         f"| {r['peak_rss_bytes'] / 1e9:.2f} GB | | |")
            continue
        s = r["stages_s"]
        lines.append(f"| {arch} | {r['params'] / 1e6:.1f}M | {r['weights_bytes'] / 1e9:.2f} GB | {s.get('load', 0):.1f} "
                     f"| {s.get('rewrite', 0):.1f} | {s.get('export', 0):.1f} | {s.get('measure', 0):.1f} "
                     f"| {s.get('latency', 0):.1f} | {r['wall_s']:.0f} | {r['wall_excl_latency_s']:.0f} "
                     f"| {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['peak_rss_x_weights']:.1f} "
                     f"| {r['onnx_bytes'] / 1e9:.2f} GB in {len(r['onnx_files'])} file(s) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT)
    ap.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                    help="time batch 1 in onnxruntime (the issue's setting); --no-latency for conversion cost alone")
    ap.add_argument("--quick", action="store_true", help="a tiny ViT, results in a temp dir (CI smoke test)")
    ap.add_argument("--out", type=Path, default=None, help="results folder [benchmarks/results, or a temp dir with --quick]")
    ap.add_argument("--profile", type=Path, default=None, help="folder for a cProfile of each conversion (ARCH.prof)")
    ap.add_argument("--rss-log", type=Path, default=None,
                    help="folder for per-stage RSS logs (ARCH.rss.jsonl, one line per stage; COMPRESS_RSS_LOG)")
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="scale-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    lat = "{batch_sizes: [1], threads: 2, runs: 20}" if args.latency else "null"
    models = {"vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10}} if args.quick \
        else {m: {"num_classes": 1000} for m in args.models.split(",")}  # vit_huge_patch14_224's default has no head
    res = {"latency": "batch 1" if args.latency else "null", "models": {},
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "load_at_start": round(os.getloadavg()[0], 2)}  # a busy box shows in every figure: say how busy
    with tempfile.TemporaryDirectory(prefix="compress-scale-") as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(RECIPE % lat)
        for arch, margs in models.items():
            print(f"{arch}: building random weights", file=sys.stderr)
            folder = build(arch, Path(tmp) / arch, margs)
            print(f"{arch}: converting", file=sys.stderr)
            log = None
            if args.rss_log:
                args.rss_log.mkdir(parents=True, exist_ok=True)
                (log := args.rss_log / f"{arch}.rss.jsonl").unlink(missing_ok=True)
            prof = None
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                prof = args.profile / f"{arch}.prof"
            res["models"][arch] = r = convert(folder, recipe, Path(tmp) / f"{arch}-out", log, prof)
            print(f"{arch}: {json.dumps(r)}", file=sys.stderr)
            for f in folder.iterdir():
                f.unlink()
    res["load_at_end"] = round(os.getloadavg()[0], 2)  # the run's own load counts: about 2 when nothing else ran
    (out / "scale.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "scale.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
