"""Coverage: the zoo as people have it. Each architecture (timm, torchvision, Hugging Face; random weights, 10
classes, 56-64 px, reduced depth where the constructor allows) goes through the real CLI in a child process with
four recipes: export only, width 0.5, lowrank 0.5 (both `scope: model`) and `target: {flops: 0.5}`. Each cell is
the FLOP ratio, or the exit code and the last error line. Writes COVERAGE.md and results/coverage.json.

    python -m benchmarks.coverage [--quick] [--only NAME,...] [--recipes export,width,...] [--out DIR] [--spawn]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import child_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TAIL = "calibration: {data: random}\nreport: {latency: null}\n"  # random weights, no images: random calibration, asked for
RECIPES = {
    "export": "passes: []\n",
    "width": "passes:\n  - width: {target: 0.5, scope: model}\n",
    "lowrank": "passes:\n  - lowrank: {target: 0.5, scope: model}\n",
    "flops": "target: {flops: 0.5}\n",
}
BUDGET, SLACK = 0.5, 0.02  # a rewriting cell counts when its FLOP ratio is within SLACK of BUDGET
TIMEOUT_S = 900
PX = 64
VIT = {"depth": 2, "img_size": PX, "num_classes": 10}
VIT14 = {**VIT, "img_size": 56}  # patch 14: 4 x 4 patches
RES = {"num_classes": 10}
RES1 = {**RES, "layers": [1, 1, 1, 1]}  # one block per stage: the block style is what is covered, not the depth


@dataclass
class Case:
    name: str  # the architecture as its library names it
    source: str  # timm | torchvision | hf
    family: str  # vit | resnet: which of the acceptance shares it counts in (other: the floor only)
    args: dict = field(default_factory=dict)
    quick: bool = False  # in the --quick subset (one per family and source)
    pending: str | None = None  # why it is expected to fail today (another branch's work)


def _timm(name, family, args, quick=False):
    return Case(name, "timm", family, args, quick)


CASES = [
    _timm("vit_tiny_patch16_224", "vit", VIT, quick=True),
    _timm("vit_small_patch16_224", "vit", VIT),
    _timm("vit_base_patch16_224", "vit", VIT),
    _timm("vit_base_patch32_224", "vit", {**VIT, "img_size": 64}),
    _timm("deit_tiny_patch16_224", "vit", VIT),
    _timm("deit_tiny_distilled_patch16_224", "vit", VIT),
    _timm("deit3_small_patch16_224", "vit", VIT),
    _timm("vit_small_patch14_reg4_dinov2", "vit", VIT14),
    _timm("vit_base_patch16_clip_224", "vit", VIT),
    _timm("vit_base_patch16_siglip_224", "vit", VIT),
    _timm("vit_medium_patch16_reg4_gap_256", "vit", VIT),
    _timm("flexivit_small", "vit", {**VIT, "patch_size": 16}),
    _timm("vit_small_patch16_18x2_224", "vit", VIT),
    _timm("vit_relpos_small_patch16_224", "vit", VIT),
    _timm("vit_srelpos_small_patch16_224", "vit", VIT),
    _timm("beit_base_patch16_224", "vit", VIT),
    _timm("beitv2_base_patch16_224", "vit", VIT),
    _timm("eva02_tiny_patch14_224", "vit", VIT14, quick=True),
    _timm("vit_small_r26_s32_224", "vit", {"depth": 2, "img_size": 64, "num_classes": 10}),
    _timm("resnet18", "resnet", RES),
    _timm("resnet34", "resnet", RES),
    _timm("resnet50", "resnet", RES1),
    _timm("resnet50d", "resnet", RES1),
    _timm("resnet18d", "resnet", RES1),
    _timm("resnet26t", "resnet", RES1),
    _timm("resnet26", "resnet", RES1, quick=True),
    _timm("seresnet50", "resnet", RES1),
    _timm("ecaresnet26t", "resnet", RES1),
    _timm("resnext50_32x4d", "resnet", RES1),
    _timm("seresnext26d_32x4d", "resnet", RES1),
    _timm("wide_resnet50_2", "resnet", RES1),
    _timm("resnetaa50", "resnet", RES1),
    _timm("resnetblur18", "resnet", RES1),
    _timm("resnet50_gn", "resnet", RES1),
    _timm("skresnet18", "resnet", RES1),
    _timm("resnetv2_50", "resnet", RES1),
    _timm("resnetv2_50x1_bit", "resnet", RES),
    Case("resnet18", "torchvision", "resnet", {}, quick=True),
    Case("resnet50", "torchvision", "resnet"),
    Case("resnext50_32x4d", "torchvision", "resnet"),
    Case("wide_resnet50_2", "torchvision", "resnet"),
    Case("vit_b_16", "torchvision", "vit", {"num_layers": 2}),
    Case("ViTForImageClassification", "hf", "vit", quick=True),
    Case("DeiTForImageClassification", "hf", "vit"),
    Case("BeitForImageClassification", "hf", "vit"),
    Case("Dinov2ForImageClassification", "hf", "vit"),
    Case("ResNetForImageClassification", "hf", "resnet"),  # a 32-channel stem: no timm form, so the floor
    Case("ResNetForImageClassification stem64", "hf", "resnet", {"embedding_size": 64, "hidden_sizes": [256, 512, 1024, 2048]}),  # resnet-50's widths
    Case("ViTMSNForImageClassification", "hf", "vit"),
    Case("SwinForImageClassification", "hf", "other"),  # neither family: the floor (export, lowrank) is what counts
    Case("ConvNextForImageClassification", "hf", "other"),
    Case("ViTForImageClassification sharded", "hf", "vit", {"shard": True}),
    Case("ViTForImageClassification bf16", "hf", "vit", {"dtype": "bfloat16"}),
]


def _build_timm(case: Case, folder: Path) -> tuple[Path, str]:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(case.name, pretrained=False, **case.args).eval()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    args = {k: v for k, v in case.args.items() if k != "num_classes"}
    cfg = {"architecture": case.name, "num_classes": 10, "model_args": args}
    if "img_size" not in args:  # a CNN takes any size: 64 px as the ViTs (timm's default, 224, cost 12x the CPU)
        cfg["pretrained_cfg"] = {"input_size": [3, PX, PX]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, ""


def _build_tv(case: Case, folder: Path) -> tuple[Path, str]:
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    if case.name.startswith("vit_"):  # vit_b_16's sizes, fewer layers, 64 px
        model = torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=case.args["num_layers"],
                                                     num_heads=12, hidden_dim=768, mlp_dim=3072, num_classes=10)
        spec = ("model: {arch: 'torchvision:VisionTransformer', num_classes: 10, kwargs: {image_size: 64, patch_size: 16, "
                f"num_layers: {case.args['num_layers']}, num_heads: 12, hidden_dim: 768, mlp_dim: 3072}}}}\n")
    else:
        model = getattr(torchvision.models, case.name)(num_classes=10)
        spec = f"model: {{arch: 'torchvision:{case.name}', num_classes: 10, img_size: 64}}\n"
    save_file({k: v.contiguous() for k, v in model.eval().state_dict().items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors", spec


def _build_hf(case: Case, folder: Path) -> tuple[Path, str]:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cls = case.name.split()[0]
    vit = dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=512, num_labels=10)
    configs = {"ViTForImageClassification": tf.ViTConfig(**vit), "DeiTForImageClassification": tf.DeiTConfig(**vit),
               "BeitForImageClassification": tf.BeitConfig(**vit),
               "Dinov2ForImageClassification": tf.Dinov2Config(**{**vit, "image_size": 56, "patch_size": 14}),
               "ViTMSNForImageClassification": tf.ViTMSNConfig(**vit),
               "SwinForImageClassification": tf.SwinConfig(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 1],
                                                           num_heads=[2, 4, 8], window_size=4, num_labels=10),
               "ConvNextForImageClassification": tf.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                                                   num_labels=10),
               "ResNetForImageClassification": tf.ResNetConfig(embedding_size=case.args.get("embedding_size", 32),
                                                               hidden_sizes=case.args.get("hidden_sizes", [64, 128, 256, 512]),
                                                               depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=10)}
    model = getattr(tf, cls)(configs[cls]).eval()
    if case.args.get("dtype"):
        model = model.to(getattr(torch, case.args["dtype"]))
    model.save_pretrained(folder, max_shard_size="200KB" if case.args.get("shard") else "10GB")
    return folder, ""


BUILD = {"timm": _build_timm, "torchvision": _build_tv, "hf": _build_hf}


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    return (err or lines or ["(no output)"])[-1]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m compress ARGS` in a child process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def run_case(case: Case, recipes: list[str], work: Path, log, cli=run_cli) -> dict:
    """Build the case's checkpoint, then one CLI run per recipe: exit code, FLOP ratio or the last error line.
    cli: what runs the command line (the tests pass one that forks a process with compress imported already)."""
    row = {**asdict(case), "label": f"{case.source}:{case.name}", "cells": {}}
    try:
        ckpt, spec = BUILD[case.source](case, work / "ckpt")
    except Exception as e:  # noqa: BLE001 - a model this library version cannot build is a row, not a crash
        row["build_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        log(f"{row['label']}: build failed: {row['build_error']}")
        return row
    for r in recipes:
        recipe = work / f"{r}.yaml"
        recipe.write_text(f"version: 1\n{spec}{RECIPES[r]}{TAIL}")
        out = work / f"out_{r}"
        t0 = time.perf_counter()
        try:
            res = cli(["apply", str(recipe), str(ckpt), "-o", str(out), "--overwrite"])
            rc, err = res.returncode, _last_error(res.stderr) if res.returncode else ""
        except subprocess.TimeoutExpired:
            rc, err = "timeout", f"no result in {TIMEOUT_S} s"
        cell = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
        if rc == 0:
            rep = json.loads((out / "report.json").read_text())
            cell.update(flops=rep["summary"]["flops"]["ratio"], model_class=rep["source"].get("adapter"))
        else:
            cell["error"] = err
        row["cells"][r] = cell
        log(f"{row['label']} {r}: " + (f"ok, FLOPs x{cell['flops']:.3f}" if rc == 0 else f"exit {rc}: {err}")
            + f" ({cell['seconds']} s)")
    row["class"] = _class_name(ckpt, case)
    return row


def _class_name(ckpt: Path, case: Case) -> str:
    if case.source == "hf":
        return case.name.split()[0]
    if case.source == "torchvision":
        return "VisionTransformer" if case.name.startswith("vit_") else "ResNet"
    import timm

    with __import__("torch").device("meta"):
        return type(timm.create_model(case.name, pretrained=False, **case.args)).__name__


def ok(cell: dict | None, rewrite: bool) -> bool:
    """A cell that counts: exit 0, and for a rewriting recipe FLOPs within SLACK of the budget."""
    return bool(cell) and cell["rc"] == 0 and (not rewrite or abs(cell["flops"] - BUDGET) <= SLACK)


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if "build_error" not in r]
    fam = [r for r in done if r["family"] in ("vit", "resnet")]
    cells = [c for r in done for c in r["cells"].values()]
    return {"architectures": len(rows), "built": len(done),
            "export_ok": sum(ok(r["cells"].get("export"), False) for r in done),
            "width_or_lowrank_ok": sum(ok(r["cells"].get("width"), True) or ok(r["cells"].get("lowrank"), True) for r in fam),
            "family_entries": len(fam),
            "flops_target_ok": (sum(ok(r["cells"].get("flops"), True) for r in done)
                                if any("flops" in r["cells"] for r in done) else None),  # None: not run
            "exit_1_or_3": sum(c["rc"] in (1, 3) for c in cells),
            "pending": sum(bool(r.get("pending")) for r in rows)}


def _cell(c: dict | None, rewrite: bool) -> str:
    if c is None:
        return ""
    if c["rc"] == 0:
        mark = "✔" if ok(c, rewrite) else "⚠"
        return f"{mark} {c['flops']:.3f}"
    return f"exit {c['rc']}: {c['error'][:160]}".replace("|", "/")


def render(rows: list[dict], meta: dict, recipes: list[str]) -> str:
    s = meta["summary"]
    lines = ["# Coverage", "",
             f"`python -m benchmarks.coverage` on {meta['date']} (code {meta['commit']}, {meta['machine']}; "
             f"{meta['minutes']:.1f} min). Random weights, 10 classes, 56-64 px, reduced depth (model_args in "
             "results/coverage.json); each cell is one `compress apply` in a child process: ✔ and the student's FLOP "
             f"ratio (a rewriting recipe counts when within {SLACK:.0%} of {BUDGET}; ⚠ = ran but outside), or the exit "
             "code and the last error line.", "",
             f"- export only: **{s['export_ok']} / {s['built']}**",
             f"- width or lowrank at 50% (FLOPs within {SLACK:.0%}): **{s['width_or_lowrank_ok']} / {s['family_entries']}** "
             "of the ViT- and ResNet-family entries",
             f"- `target: {{flops: 0.5}}`: " + (f"**{s['flops_target_ok']} / {s['built']}**"
                                                if s["flops_target_ok"] is not None else "not run"),
             f"- exit 1 or 3 anywhere: **{s['exit_1_or_3']}**; expected to fail until another branch lands: {s['pending']}",
             "", "| architecture | class | " + " | ".join(recipes) + " | note |",
             "|---|---|" + "---|" * len(recipes) + "---|"]
    for r in rows:
        if "build_error" in r:
            cells = [f"not built: {r['build_error'][:120]}"] + [""] * (len(recipes) - 1)
        else:
            cells = [_cell(r["cells"].get(k), k != "export") for k in recipes]
        lines.append(f"| {r['label']} | {r.get('class', '')} | " + " | ".join(cells) + f" | {r.get('pending') or ''} |")
    return "\n".join(lines) + "\n"


def forked_cli(args: list[str]) -> subprocess.CompletedProcess:
    """The same command line in a child forked from a process that has imported compress already (compress/run/forkrun.py):
    exit code and output as `python -m compress` gives them, without its ~5 s of imports per cell."""
    from compress.cli import main
    from compress.run import forkrun

    return forkrun.run(main, args, REPO, child_env(), timeout=TIMEOUT_S)


def main(argv: list[str] | None = None, cli=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one architecture per family and source")
    ap.add_argument("--only", default="", help="comma-separated labels or names")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", type=Path, default=None, help="write COVERAGE.md and coverage.json here (default: repo)")
    ap.add_argument("--spawn", action="store_true", help="a fresh `python -m compress` per cell (default: forked)")
    a = ap.parse_args(argv)
    cli = cli or (run_cli if a.spawn else forked_cli)
    recipes = [r for r in a.recipes.split(",") if r]
    bad = set(recipes) - set(RECIPES)
    if bad:
        ap.error(f"unknown recipes {sorted(bad)}; choose from {', '.join(RECIPES)}")
    only = {o for o in a.only.split(",") if o}
    cases = [c for c in CASES if (not a.quick or c.quick) and (not only or c.name in only or f"{c.source}:{c.name}" in only)]
    t0 = time.time()

    def log(msg):
        print(f"[{dt.datetime.now(dt.timezone.utc):%H:%M:%S}] {msg}", flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    md_dir, json_dir = a.out or REPO, a.out or RESULTS
    rows = []
    for i, case in enumerate(cases):
        with tempfile.TemporaryDirectory(prefix="coverage-") as tmp:
            rows.append(run_case(case, recipes, Path(tmp), log, cli))
        meta = {"date": f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "commit": commit or "?",
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "minutes": (time.time() - t0) / 60,
                "recipes": {k: RECIPES[k] + TAIL for k in recipes}, "cases_done": f"{i + 1} / {len(cases)}",
                "complete": i + 1 == len(cases) and not a.quick and not only, "summary": summarise(rows)}
        json_dir.mkdir(parents=True, exist_ok=True)  # after every case: a run cut short still says what it saw
        (json_dir / "coverage.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md_dir.mkdir(parents=True, exist_ok=True)
    (md_dir / "COVERAGE.md").write_text(render(rows, meta, recipes))
    log(f"summary: {json.dumps(meta['summary'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
