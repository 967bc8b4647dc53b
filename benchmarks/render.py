"""BENCHMARKS.md and the frontier chart, generated from the bench JSON only (no figure typed by hand).

The interpretation is not generated: it is read from benchmarks/reading.md, written by a
person after looking at the numbers, and shown under its own heading.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KINDS = {"teacher": ("black", "*"), "ours": ("tab:blue", "o"), "torch-pruning": ("tab:orange", "s"),
         "svd": ("tab:green", "^"), "scratch": ("tab:gray", "x"), "int8-dynamic": ("tab:purple", "D"),
         "width": ("tab:red", "v"), "torch-pruning-r8": ("tab:brown", "P"), "int8-static": ("tab:pink", "d"),
         "ours-int8": ("tab:cyan", "o"), "torch-pruning-int8": ("tab:olive", "s"),
         "token-merge": ("gold", "h"), "width+token-merge": ("darkgoldenrod", "H")}


def _rel(path: Path, md: Path) -> str:
    return Path(os.path.relpath(path.resolve(), md.resolve().parent)).as_posix()


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ms(row, bs) -> str:
    v = (row.get("latency") or {}).get(bs)
    return "-" if v is None else f"{v['p50_ms']:.2f} ({v['teacher_p50_ms']:.2f})"


def _speed(row, bs) -> str:
    v = (row.get("latency") or {}).get(bs)
    return "-" if v is None else f"{v['speedup']:.2f}x / {v['speedup_per_flop_cut']:.2f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _passes(passes) -> str:
    return "; ".join(json.dumps(p, separators=(",", ":")).replace("|", "/") for p in passes) or "(none)"


def teacher_table(t: dict) -> list[str]:
    lines = ["| contender | budget | params | FLOPs (% teacher) | ONNX MB | p50 ms b1 (teacher) | p50 ms b8 (teacher) "
             "| speedup b1 / ÷FLOP cut | speedup b8 / ÷FLOP cut | top-1 % | agreement % | convert s | distill s "
             "| oldest ORT run on |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    tr = t.get("teacher_row")
    if tr:
        lines.append(f"| teacher (fp32) | - | {tr['params'] / 1e6:.2f}M | {tr['flops'] / 1e6:.1f}M (100) | {_mb(tr['onnx_bytes'])} "
                     f"| {_ms(tr, '1')} | {_ms(tr, '8')} | - | - | {_pct(tr['top1'])} | 100.0 | - | - | - |")
    for r in t["rows"]:
        b = "-" if r["budget"] is None else f"{r['budget']:.0%}"
        if "params" not in r:
            lines.append(f"| {r['contender']} | {b} | {r.get('skipped') or 'FAILED: ' + r.get('error', '?')} |"
                         + " |" * 11)
            continue
        lines.append(f"| {r['contender']} | {b} | {r['params'] / 1e6:.2f}M | {r['flops'] / 1e6:.1f}M ({_pct(r['flops_ratio'])}) "
                     f"| {_mb(r['onnx_bytes'])} | {_ms(r, '1')} | {_ms(r, '8')} | {_speed(r, '1')} | {_speed(r, '8')} "
                     f"| {_pct(r['top1'])} | {_pct(r['agreement'])} | {_s(r['convert_s'])} | {_s(r['distill_s'])} "
                     f"| {r.get('oldest_runtime') or '-'} |")
    return lines


def recipes_table(t: dict) -> list[str]:
    lines = ["| contender | budget | planner's pick | recipe (passes) | KL before training: calibration / held-out images "
             "| same selection without refit: calibration / held-out |", "|---|---|---|---|---|---|"]
    for r in t["rows"]:
        if "passes" in r:
            b = "-" if r["budget"] is None else f"{r['budget']:.0%}"
            kl, plain = (" / ".join("-" if r.get(k + s) is None else f"{r[k + s]:.4f}" for k in ("calib_kl", "holdout_kl"))
                         for s in ("", "_no_refit"))
            same = f" (the run of {r['same_run_as']})" if r.get("same_run_as") else ""
            lines.append(f"| {r['contender']}{same} | {b} | {r.get('picked') or '-'} | `{_passes(r['passes'])}` | {kl} | {plain} |")
    return lines


def scaling_table(rows: list[dict]) -> list[str]:
    lines = ["| model | variant | params | GFLOPs (% full) | ONNX MB | p50 ms b1 | speedup b1 | p50 ms b8 | speedup b8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in rows:
        if "error" in s:
            lines.append(f"| {s['arch']} | FAILED: {s['error']} |" + " |" * 7)
            continue
        for name, v in s["variants"].items():
            lat = v["latency"]
            cells = [f"{lat[bs]['p50_ms']:.1f} | {lat[bs]['speedup']:.2f}x" if bs in lat else "- | -" for bs in ("1", "8")]
            lines.append(f"| {s['arch']} | {name} | {v['params'] / 1e6:.1f}M | {v['flops'] / 1e9:.2f} ({_pct(v['flops_ratio'])}) "
                         f"| {_mb(v['onnx_bytes'])} | {cells[0]} | {cells[1]} |")
    return lines


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = result["teachers"]
    # Speedup against the teacher timed in the same process is robust to a shared CPU; absolute
    # milliseconds from different runs are not, so they are not plotted.
    axes_x = [("FLOPs (% of the teacher)", lambda r: 100 * r["flops_ratio"]),
              ("onnxruntime speedup over the teacher, batch 8 (p50, interleaved)", lambda r: r["latency"]["8"]["speedup"])]
    fig, axes = plt.subplots(max(1, len(ts)), 2, figsize=(12, 4.5 * max(1, len(ts))), squeeze=False)
    for row_axes, t in zip(axes, ts):
        tr = t.get("teacher_row")
        pts = ([("teacher", None, tr)] if tr else []) + [(r["contender"], r["budget"], r) for r in t["rows"] if "top1" in r]
        for ax, (label, xof) in zip(row_axes, axes_x):
            for kind in KINDS:
                sel = [(b, r) for k, b, r in pts if k == kind and r.get("top1") is not None and "8" in r.get("latency", {})]
                if not sel:
                    continue
                color, marker = KINDS[kind]
                # the teacher is the reference: 100% of its FLOPs, speedup 1 by definition
                xs = [xof(r) if kind != "teacher" else (100.0 if "FLOPs" in label else 1.0) for _, r in sel]
                ys = [100 * r["top1"] for _, r in sel]
                ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if len(sel) > 1 else "", label=kind)
                for (b, _), x, y in zip(sel, xs, ys):
                    if b is not None:
                        ax.annotate(f"{b:.0%}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set(title=f"{t['teacher']}: top-1 on {tr and tr['eval_images']} CIFAR-10 test images", xlabel=label,
                   ylabel="top-1 (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gpu_section(gpu: dict | None) -> list[str]:
    if not gpu:
        return ["No GPU was lent to this run: no GPU figures (distillation images/s and share of peak bf16 FLOP/s need "
                "one; `benchmarks/gpu.py` measures them when CUDA is present, and `benchmarks/train_teacher.py` and the "
                "distillation use CUDA then too)."]
    rows = gpu["rows"]
    peak = rows[0]["peak_bf16_flops"] if rows else None
    out = [f"Device: **{gpu['device']}** (CUDA {gpu['torch_cuda']}), dense bf16 peak "
           f"{f'{peak / 1e12:.0f} TFLOP/s (datasheet)' if peak else 'not in the table of `benchmarks/gpu.py`'}. "
           "Student = a copy of the teacher, KD step with bf16 autocast and AdamW. *loop* = the pipeline's "
           "distillation on `cifar10/train.zip` (data loading included); *compute* = the same step on a batch already "
           "on the GPU. FLOP/s = images/s × (teacher forward + 3 × student forward).", "",
           "| teacher | input | batch | train GFLOP / image | loop images/s | loop TFLOP/s (% peak) | compute images/s "
           "| compute TFLOP/s (% peak) |", "|---|---|---|---|---|---|---|---|"]

    def share(r, k):
        s = r[f"{k}_share_of_peak"]
        return f"{r[f'{k}_flops_per_s'] / 1e12:.2f} ({100 * s:.1f}%)" if s is not None else f"{r[f'{k}_flops_per_s'] / 1e12:.2f} (-)"

    for r in rows:
        out.append(f"| {r['teacher']} | {'×'.join(map(str, r['input_size']))} | {r['batch_size']} | "
                   f"{r['train_flops_per_image'] / 1e9:.2f} | {r['loop_images_per_s']:,.0f} | {share(r, 'loop')} | "
                   f"{r['compute_images_per_s']:,.0f} | {share(r, 'compute')} |")
    return out


def render(result: dict, md: Path, png: Path, reading: Path) -> None:
    chart(result, png)
    m, c = result["machine"], result["config"]
    load0, load1 = result.get("load_at_start"), result.get("load_at_end")
    d = c["steps"] * c["batch_size"]
    default = f"python -m benchmarks.bench{' --quick' if result['mode'] == 'quick' else ''}"
    cmd = result.get("command") or default  # a subset run (--budgets, --teacher, ...) says so
    when = (f"on {result['started']}, in {result['total_s'] / 60:.1f} minutes" if "total_s" in result else
            f"started {result['started']}; **PARTIAL: rendered from the JSON of a run that had not finished**")
    make = "make bench-quick" if result["mode"] == "quick" else "make bench"
    head = (f"Generated by {f'`{make}` (`{cmd}`)' if cmd == default else f'`{cmd}` (a subset of `{make}`)'} {when}; "
            "every figure below comes from that one run "
            f"(raw data: `{_rel(Path(result['json']), md)}`). Mode: **{result['mode']}**.")
    out = ["# Benchmarks: the accuracy–latency frontier", "",
           head, "",
           f"- Machine: {m['cpu']}, {m['cores']} cores; onnxruntime {m['ort_threads']} intra-op threads (1 inter-op, no spinning), "
           f"torch {m['torch_threads']} threads (OMP_WAIT_POLICY={result.get('omp_wait_policy')}).",
           f"- Versions: Python {m['python']}, torch {m['torch']}, timm {m['timm']}, onnx {m['onnx']}, onnxruntime "
           f"{m['onnxruntime']}, torch-pruning {m.get('torch_pruning')}, numpy {m['numpy']}; {m['os']}.",
           f"- Load average (1/5/15 min) at start {load0}, at end {load1}: above {m['cores']} means other processes "
           "shared the CPU during the run, which makes every latency and every second here slower and noisier "
           "(teacher and contender are timed interleaved, so their ratios suffer less than their absolute values).",
           f"- GPU: {result['gpu']['device']} (see the GPU section)." if result.get("gpu") else "- No GPU: see the GPU section.", "",
           "## What was run", "",
           f"- Teachers: every model directory under `../shared/data/models/` ({', '.join(t['teacher'] for t in result['teachers'])}).",
           f"- FLOP budgets: {', '.join(f'{b:.0%}' for b in c['budgets'])} of each teacher (a contender may exceed its "
           "budget by 2%: widths and ranks are rounded).",
           f"- The same distillation for every trained contender: {c['steps']} steps × batch {c['batch_size']} = {d:,} images "
           "of `cifar10/train.zip` (KD on logits, T = 2, AdamW lr 5e-4, warm-up then cosine, seed 0, CPU). This is a "
           "**very small** budget, chosen so the whole run fits in an hour on 2 cores: it measures how much of the "
           "teacher each starting point keeps and how fast it recovers, not converged accuracy.",
           f"- Accuracy: top-1 and agreement with the teacher on {c['eval_images']} evenly spaced images of "
           "`cifar10/test.zip` (the teacher's own top-1 on the same images is in the teacher row).",
           f"- Latency: onnxruntime CPU, fp32 ONNX (opset 18, onnxslim), batch {c['latency']['batch_sizes']}, "
           f"{c['latency']['threads']} threads, {c['latency']['warmup']} warm-up runs then {c['latency']['runs']} runs "
           "alternating contender and teacher in one process; p50. `speedup / ÷FLOP cut` = (teacher p50 / contender p50) "
           "÷ (teacher FLOPs / contender FLOPs): 1.0 means latency follows FLOPs exactly.",
           "- Contenders: **ours** = `compress plan` asked for the FLOP budget (`target: {flops: B}`): the candidate "
           f"recipe of this tool's passes with the lowest KL to the teacher after the rewrite, before training, on "
           f"{c['calib_images']} held-out images (not the {c['calib_images']} calibration images the refits are fitted "
           "to), among those meeting the budget (candidates: every window of MLP "
           "stripping, auto stripping, whitened low-rank alone and on top of short strips with the greedy and the "
           "uniform allocation, the width pass on each of its layer sets; the table of recipes names the pick); **width** = "
           "the `width` pass alone at the budget of the whole model (`scope: model`, uniform allocation topped up to the "
           "budget; on a ResNet the inner widths alone or with each stage's residual width as well, whichever has the "
           "lower held-out KL, named in the table of recipes; "
           "its last column is the KL of the same selection with the consumers only sliced, no least-squares "
           "refit; a contender whose recipe equals ours reuses ours' run, named in the table of recipes); **torch-pruning** = Torch-Pruning `BasePruner`, `GroupMagnitudeImportance(p=2)`, uniform ratio "
           "bisected to the budget, classifier kept, ViT head dims pruned as in its timm example, widths unrounded "
           "(its documented default); **torch-pruning-r8** = the same with `round_to=8` (widths multiples of 8: the "
           "fair latency contender); **svd** = the "
           "`lowrank` pass with plain weight SVD at the budget as a share of the whole model (`scope: model`; greedy or uniform allocation, "
           "whichever has the lower held-out KL); **int8-dynamic** = the teacher through onnxruntime "
           "`quantize_dynamic` (no training; FLOPs unchanged, cheaper arithmetic); **int8-static** = the teacher through "
           "`quantize_static` (QDQ, per-channel, calibrated on the calibration images); **ours-int8** and "
           "**torch-pruning-int8** = the int8 file of the same run as ours / torch-pruning (static on a ResNet, dynamic on a ViT), quantized from the "
           "distilled weights. The from-scratch contender of "
           "earlier runs (every rewrite beat it by 30+ points) is left out to keep the run within the hour.",
           "- Seconds: `convert` = the rewrite stage of the pipeline (passes + their checks; the planner's search for "
           "ours is extra, in the JSON as `search_s`), `distill` = the training loop.", ""]
    if not result.get("lowrank_available"):
        out += ["**The `lowrank` pass was not in this build**: svd and the low-rank parts of ours were skipped.", ""]
    for t in result["teachers"]:
        out += [f"## {t['teacher']} ({t['family']}, input {'×'.join(map(str, t['input_size']))})", ""]
        out += teacher_table(t) + ["", "Recipes used:", ""] + recipes_table(t) + [""]
    out += ["## Frontier", "", f"![top-1 against FLOPs and against measured speedup]({_rel(png, md)})", "",
            "Top-1 against FLOPs (left) and against the onnxruntime batch-8 speedup over the teacher timed in the same "
            "process (right); labels are FLOP budgets. Up and to the left (FLOPs) or right (speedup) is better.", ""]
    if result.get("scaling"):
        out += ["## Scaling: ImageNet-size architectures, random weights, 224×224", "",
                f"Latency does not depend on weight values, so random timm weights are used. mlp-strip-half removes the "
                f"MLP of the middle half of the blocks; lowrank-half is `lowrank` whitened at target 0.5; width-half is `width` at "
                f"half the model's FLOPs (uniform allocation, widths multiples of 8, the pass's default); width-half-16 is the same at "
                f"multiples of 16 over the family's widest layer set (a ResNet's stage residual widths too). "
                f"onnxruntime {c['latency']['threads']} threads, interleaved, {result['scaling'][0].get('runs')} runs "
                f"after {result['scaling'][0].get('warmup', 10)} warm-ups, p50.", ""] + scaling_table(result["scaling"]) + [""]
        # (warm-ups: 10 since a127bc7, before the field was recorded)
    out += ["## GPU", ""] + gpu_section(result.get("gpu")) + [""]
    failed = [f"- {t['teacher']} {r['contender']} @ {r['budget']}: {r['error']}" for t in result["teachers"] for r in t["rows"]
              if "error" in r]
    if failed:
        out += ["## Failures", ""] + failed + [""]
    out += ["## Reading (written by hand after the run; not generated)", ""]
    out += [reading.read_text().strip() if reading.is_file() else "_Not written for this run._", ""]
    old = md.read_text() if md.is_file() else ""
    if KEEP in old:  # the sections other harnesses wrote (scale, plans, ceiling) outlive a new bench run
        out += [KEEP + old.split(KEEP, 1)[1].rstrip("\n"), ""]
    md.write_text("\n".join(out))


KEEP = "<!-- below: sections from other harnesses (benchmarks.scale, benchmarks.plans, benchmarks.ceiling), kept by render -->"


if __name__ == "__main__":  # re-render from a saved JSON: python -m benchmarks.render results/bench.json BENCHMARKS.md [READING]
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    reading = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent / "reading.md"
    render({**json.loads(src.read_text()), "json": str(src)}, dst, src.parent / "frontier.png", reading)
