"""The benchmark harness: `--quick` runs every contender kind end to end; the teacher trainer runs a few steps."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import CIFAR_TEST, CIFAR_TRAIN, REPO, VIT_TEACHER, need_shared

KINDS = {"int8-dynamic", "int8-static", "ours", "ours-int8", "svd", "width", "torch-pruning", "torch-pruning-r8",
         "torch-pruning-int8", "token-merge", "token-reference"}  # width+token-merge: full runs only


@pytest.mark.slow
def test_bench_quick_runs_every_contender(tmp_path):
    need_shared(VIT_TEACHER)
    need_shared(CIFAR_TRAIN)
    from benchmarks.render import KEEP

    # the sections other harnesses append below the marker outlive the re-render; what is above it does not
    (tmp_path / "BENCHMARKS.md").write_text(f"stale table\n{KEEP}\n\n## Conversion at scale\nkept\n")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=1800)  # ~2 min on an idle 2-core box
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    (teacher,) = result["teachers"]
    rows = teacher["rows"]
    assert {r["contender"] for r in rows} == KINDS
    assert not [r for r in rows if "error" in r]
    ran = {r["contender"] for r in rows if "top1" in r}
    assert ran == (KINDS if result["lowrank_available"] else KINDS - {"svd"})  # svd needs the lowrank pass
    t = teacher["teacher_row"]
    for r in rows:
        if r["contender"] in ran - {"int8-dynamic", "int8-static"}:
            assert r["flops_ratio"] <= r["budget"] * 1.02, r  # every contender meets its FLOP budget
            if r["contender"] != "token-reference":  # the hand-built reference is timed, not trained
                assert r["distill_steps"] == result["config"]["steps"]  # and gets the same distillation
            assert set(r["latency"]) == {"1", "8"}
    for kind in ("int8-dynamic", "int8-static"):
        int8 = next(r for r in rows if r["contender"] == kind)
        assert int8["flops"] == t["flops"] and int8["onnx_bytes"] < t["onnx_bytes"] / 2
    for kind, of in (("ours-int8", "ours"), ("torch-pruning-int8", "torch-pruning")):  # the same run's int8 file
        q, f = (next(r for r in rows if r["contender"] == k) for k in (kind, of))
        assert q["same_run_as"] == of and q["flops"] == f["flops"] and q["onnx_bytes"] < f["onnx_bytes"] / 2
    width = next(r for r in rows if r["contender"] == "width")
    assert width["calib_kl"] < width["calib_kl_no_refit"]  # the least-squares refit beats slicing alone
    assert all("error" not in s for s in result["scaling"])
    md = (tmp_path / "BENCHMARKS.md").read_text()
    for s in result["scaling"]:  # every variant of the scaling table is a row of BENCHMARKS.md
        assert all(f"| {s['arch']} | {name} |" in md for name in s["variants"]), s["arch"]
    assert result["machine"]["onnxruntime"] in md and "## GPU" in md and (tmp_path / "frontier.png").stat().st_size > 0
    assert "stale table" not in md and md.index("## GPU") < md.index(KEEP) < md.index("## Conversion at scale\nkept")


@pytest.mark.slow
def test_train_teacher_writes_a_loadable_timm_dir(tmp_path):
    need_shared(CIFAR_TRAIN)
    need_shared(CIFAR_TEST)
    from benchmarks.train_teacher import train
    from compress.load.model import load

    info = train("vit", tmp_path / "t", train_data=CIFAR_TRAIN, test_data=CIFAR_TEST, epochs=None, steps=3, batch_size=8,
                 lr=None, device="cpu", seed=0, eval_images=32, workers=0, log=lambda _m: None)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    shared = json.loads((VIT_TEACHER / "config.json").read_text()) if VIT_TEACHER.exists() else cfg
    assert set(shared) - {"num_features", "global_pool"} <= set(cfg)  # the same format as the shared teachers
    assert cfg["pretrained_cfg"]["label_names"][0] == "airplane" and cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    loaded = load(str(tmp_path / "t"))
    assert loaded.data_cfg["input_size"] == (3, 32, 32) and loaded.model.num_classes == 10
    assert info["steps"] == 3 and len(info["loss_history"]) == 3 and info["test_images"] == 32


def test_gpu_section_measures_and_renders_on_cpu(tmp_path):
    """The GPU section's code on CPU: both rates measured, FLOPs counted, no share without a known peak."""
    need_shared(VIT_TEACHER)
    need_shared(CIFAR_TRAIN)
    from benchmarks.gpu import measure, peak_bf16
    from benchmarks.render import gpu_section

    assert peak_bf16("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_bf16("NVIDIA H100 PCIe") == 756.5e12
    assert peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12 and peak_bf16("NVIDIA A10") == 125e12
    assert peak_bf16("NVIDIA H200") == 989.4e12 and peak_bf16("some CPU") is None
    r = measure(VIT_TEACHER, CIFAR_TRAIN, device="cpu", batch_size=4, steps=2, warmup=1, workers=0)
    assert r["device"] == "cpu" and not r["amp_bf16"] and r["peak_bf16_flops"] is None
    assert r["loop_images_per_s"] > 0 and r["compute_images_per_s"] > 0
    assert r["compute_share_of_peak"] is None
    assert r["compute_flops_per_s"] == r["compute_images_per_s"] * r["train_flops_per_image"]
    text = "\n".join(gpu_section({"rows": [{**r, "peak_bf16_flops": 1e15, "loop_share_of_peak": 0.001,
                                            "compute_share_of_peak": 0.002}], "torch_cuda": "13.2", "device": "X"}))
    assert "| vit_cifar10 | 3×32×32 | 4 |" in text and "(0.2%)" in text and "1000 TFLOP/s" in text
    assert "No GPU was lent" in gpu_section(None)[0]


@pytest.mark.slow
def test_ceiling_times_hand_built_and_width_models_against_their_teachers(tmp_path):
    """benchmarks.ceiling builds timm's own half-width ViT and the width pass at keep 0.5, each half the FLOPs of
    its own teacher, and reports speedup / FLOP cut per thread count and batch (2 runs: shape only, no timing claim)."""
    need_shared(VIT_TEACHER)
    from benchmarks.ceiling import main

    res = main(["--runs", "2", "--threads", "1", "--teachers", VIT_TEACHER.name, "--out", str(tmp_path)])
    r = res["teachers"][VIT_TEACHER.name]
    assert r["flops"]["timm teacher"] == r["flops"]["teacher"]
    for half, full in (("timm half", "timm teacher"), ("width keep 0.5", "teacher")):
        assert 0.45 < r["flops"][half] / r["flops"][full] < 0.55
    rows = r["threads"]["1"]
    assert set(rows) == {"timm teacher", "timm half", "teacher", "width keep 0.5"} and rows["teacher"]["8"]["per_cut"] == 1.0
    assert "width keep 0.5" in (tmp_path / "ceiling.md").read_text()


@pytest.mark.slow
def test_ceiling_builds_an_imagenet_architecture_with_random_weights(tmp_path):
    """`--archs`: a timm architecture at 224 px, random weights; the hand-built half and `width` cut from the same
    teacher, both against it (1 run: shape only, no timing claim)."""
    from benchmarks.ceiling import main

    res = main(["--runs", "1", "--threads", "1", "--teachers", "", "--archs", "vit_tiny_patch16_224",
                "--out", str(tmp_path)])
    r = res["teachers"]["vit_tiny_patch16_224"]
    assert r["input_size"] == [3, 224, 224] and set(r["threads"]["1"]) == {"timm teacher", "timm half", "width keep 0.5"}
    for half in ("timm half", "width keep 0.5"):
        assert 0.45 < r["flops"][half] / r["flops"]["timm teacher"] < 0.55
    assert r["threads"]["1"]["timm teacher"]["8"]["per_cut"] == 1.0
