"""A timm ResNet goes through apply (export + report) and is told which passes do not apply."""
from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import timm
from tests.conftest import run_cli, write_recipe

MODEL = "model: {arch: timm:resnet18, num_classes: 10, img_size: 32}\n"
FAST = "report: {latency: {batch_sizes: [1, 2], threads: 1, warmup: 1, runs: 3}}\n"


def _resnet18(tmp_path):
    torch.manual_seed(0)
    m = timm.create_model("resnet18", num_classes=10).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(m.state_dict(), str(path))
    return path


def test_resnet_apply_exports_and_reports(tmp_path):
    ckpt = _resnet18(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\n" + MODEL + "passes: []\n" + FAST)
    res = run_cli("apply", recipe, ckpt, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["source"]["family"] == "resnet" and rep["input_size"] == [3, 32, 32]
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    assert rep["summary"]["params"]["ratio"] == 1.0


def test_resnet_refuses_vit_passes_by_name(tmp_path):
    ckpt = _resnet18(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\n" + MODEL + "passes:\n  - mlp_strip: {blocks: all}\n" + FAST)
    res = run_cli("apply", recipe, ckpt, "-o", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.strip() == ("error: pass 'mlp_strip' does not apply to timm-resnet models (it needs family vit); "
                                  "module types of this ResNet: ResNet, BasicBlock, SelectAdaptivePool2d; passes that "
                                  "apply: lowrank, tie_rowcol, width; remove it from the recipe or set skip_inapplicable: true")
    assert not (tmp_path / "out").exists()


def test_resnet_skip_inapplicable_records_the_skip(tmp_path):
    ckpt = _resnet18(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\n" + MODEL + "skip_inapplicable: true\n"
                          "passes:\n  - qk_merge: {mode: exact}\n  - vo: {mode: fold}\n" + FAST)
    res = run_cli("apply", recipe, ckpt, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    assert "skipped qk_merge" in res.stdout and "skipped vo" in res.stdout
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["pass"] for e in rep["passes"] if "skipped" in e] == ["qk_merge", "vo"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


def test_inspect_resnet_says_which_passes_do_not_apply(tmp_path):
    ckpt = _resnet18(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\n" + MODEL)
    res = run_cli("inspect", ckpt, "--recipe", recipe, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["family"] == "resnet" and info["blocks"] == 8 and info["block_type"] == "BasicBlock"
    applies = {k for k, v in info["passes"].items() if v["applies"]}
    assert applies == {"lowrank", "tie_rowcol", "width"}  # every other shipped pass is ViT-only
    assert info["passes"]["width"]["flops_change"] < -0.3  # half the model's FLOPs, rounded widths
    assert {"mlp_strip", "qk_merge", "vo", "crate", "attn_diffusion"} <= set(info["passes"])
    assert info["passes"]["tie_rowcol"]["flops_change"] == 0 and info["passes"]["tie_rowcol"]["params_change"] < 0
