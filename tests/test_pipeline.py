"""`compress apply` on tiny models: artifacts verified, figures consistent, failures publish nothing."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

import compress.passes.qk_merge as qk_mod
from compress.core.errors import InputError, VerificationError
from compress.load.model import load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from tests.conftest import FAST, run_cli, save_timm_dir, tiny_vit, tiny_vit_args, write_recipe

ONE_HEAD_EXACT = "version: 1\npasses:\n  - qk_merge: {mode: exact}\n  - vo: {mode: fold}\n" + FAST


@pytest.fixture
def one_head_dir(tmp_path):
    return save_timm_dir(tiny_vit(heads=1), "vit_tiny_patch16_224", tiny_vit_args(heads=1), tmp_path / "vit1")


def test_cli_exact_one_head_end_to_end(tmp_path, one_head_dir):
    recipe = write_recipe(tmp_path / "r.yaml", ONE_HEAD_EXACT)
    out = tmp_path / "out"
    res = run_cli("apply", recipe, one_head_dir, "-o", out)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "model.onnx", "report.json", "report.md",
                                               "report.png", "recipe.yaml"}
    assert not list(tmp_path.glob(".out.tmp-*"))  # staging dir renamed, not left behind
    rep = json.loads((out / "report.json").read_text())
    for entry in rep["passes"]:
        assert entry["exact"] and entry["verified"]["rel_diff"] <= 1e-4
    s = rep["summary"]
    assert s["params"]["student"] < s["params"]["teacher"]  # one head: merging shrinks
    assert s["onnx_bytes"]["student"] == (out / "model.onnx").stat().st_size
    assert s["safetensors_bytes"]["student"] == (out / "model.safetensors").stat().st_size
    assert set(s["latency"]) == {"1", "2"}
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    # the saved tensors are the student's: the merged score weight is there, qkv is gone
    keys = set(load_file(str(out / "model.safetensors")))
    assert "blocks.0.attn.score.weight" in keys and not any("qkv" in k for k in keys)
    assert sum(v.numel() for v in load_file(str(out / "model.safetensors")).values()) == s["params"]["student"]
    assert "| qk_merge | yes |" in (out / "report.md").read_text()
    # the written model reloads (structure replayed from the recipe) and matches the ONNX file
    model = load_compressed(out)
    x = torch.randn(3, 3, 16, 16)
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), onnx_out, atol=1e-4)
    assert "FLOPs / image" in res.stdout and "ORT latency b1 p50" in res.stdout


def test_onnx_runs_with_another_batch_size(tmp_path, one_head_dir):
    out = tmp_path / "out"
    rec = parse_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": [1]}}], "report": {"latency": None}})
    apply(rec, str(one_head_dir), out, log=lambda m: None)
    s = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for bs in (1, 5):
        y = s.run(None, {"input": np.zeros((bs, 3, 16, 16), np.float32)})[0]
        assert y.shape == (bs, 5)


def test_broken_exact_pass_fails_and_publishes_nothing(tmp_path, one_head_dir, monkeypatch):
    """The every-run exactness check is real: a merge that is off by 2% must stop the run."""
    real = qk_mod.merge_qk

    def broken(score):
        m = real(score)
        with torch.no_grad():
            m.weight.mul_(1.02)
            m.weight[:, 0, :] += 0.3
        return m

    monkeypatch.setattr(qk_mod, "merge_qk", broken)
    rec = parse_recipe({"version": 1, "passes": [{"qk_merge": {"mode": "exact"}}]})
    with pytest.raises(VerificationError, match="declared exact"):
        apply(rec, str(one_head_dir), tmp_path / "out", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit1"]


def test_dry_run_writes_nothing(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - mlp_strip: {blocks: all}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "dry run: nothing written" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_missed_gate_exits_4_and_publishes_nothing(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n"
                          "gates: {max_params_ratio: 0.1}\n" + FAST)
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 4
    assert res.stderr.strip().splitlines()[-1].startswith("error: gate max_params_ratio missed: measured 0.")
    assert "params" in res.stderr  # the measured table is still shown
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_gate_met_passes(tmp_path, vit_dir):
    rec = parse_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": "all"}}],
                        "gates": {"max_params_ratio": 0.9, "max_flops_ratio": 0.9}, "report": {"latency": None}})
    record = apply(rec, str(vit_dir), tmp_path / "out", log=lambda m: None)
    assert [g["ok"] for g in record["gates"]] == [True, True]


def test_overwrite_replaces_a_previous_result_only(tmp_path, vit_dir):
    """--overwrite replaces what compress published; a user's folder only with --overwrite=force."""
    out = tmp_path / "out"
    rec = parse_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": [0]}}], "report": {"latency": None}})
    apply(rec, str(vit_dir), out, log=lambda m: None)
    first = (out / "report.json").read_text()
    apply(rec, str(vit_dir), out, overwrite=True, log=lambda m: None)
    assert (out / "report.json").read_text() != first  # a new run's report (its own timestamp and timings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "vit"]  # no staging, backup or lock left

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "IMPORTANT.txt").write_text("precious")
    with pytest.raises(InputError, match="--overwrite=force"):
        apply(rec, str(vit_dir), mine, overwrite=True, log=lambda m: None)
    assert (mine / "IMPORTANT.txt").read_text() == "precious"
    apply(rec, str(vit_dir), mine, overwrite="force", log=lambda m: None)
    assert not (mine / "IMPORTANT.txt").exists() and (mine / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "vit"]


def test_weights_file_with_model_section(tmp_path):
    m = tiny_vit(heads=2)
    torch.save(m.state_dict(), tmp_path / "w.pth")
    args = tiny_vit_args(heads=2)
    rec = parse_recipe({"version": 1, "model": {"arch": "timm:vit_tiny_patch16_224", "num_classes": 5, "img_size": 16,
                                                "kwargs": {k: v for k, v in args.items() if k not in ("num_classes", "img_size")}},
                        "passes": [{"mlp_strip": {"blocks": [0, 1]}}], "report": {"latency": None}})
    record = apply(rec, str(tmp_path / "w.pth"), tmp_path / "out", log=lambda m: None)
    assert record["summary"]["flops"]["ratio"] < 0.8
    assert record["passes"][0]["vs_teacher"]["agreement"] <= 1.0


def test_inspect_vit_measures_each_pass(vit_dir):
    res = run_cli("inspect", vit_dir, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert (info["family"], info["blocks"], info["heads"], info["width"]) == ("vit", 2, 3, 24)
    p = info["passes"]
    assert p["mlp_strip"]["params_change"] < 0 and not p["mlp_strip"]["exact"]
    assert p["qk_merge"]["exact"] and p["qk_merge"]["params_change"] > 0  # 3 heads: merging grows
    assert p["vo"]["exact"] and p["vo"]["flops_change"] > 0
    text = run_cli("inspect", vit_dir).stdout
    assert "mlp_strip" in text and "approximate" in text


def test_load_compressed_refuses_foreign_file(tmp_path, vit_dir):
    with pytest.raises(InputError, match="not written by compress apply"):
        load_compressed(vit_dir / "model.safetensors")


def test_hub_id_offline_fails_at_once(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no network traffic from the test
    res = subprocess.run([sys.executable, "-m", "compress", "inspect", "timm:resnet18"], capture_output=True, text=True,
                         env=env, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "pass a local checkpoint path" in res.stderr
