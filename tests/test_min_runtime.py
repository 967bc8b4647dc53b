"""export.min_runtime: every ONNX file also runs on an isolated onnxruntime 1.16.3 (built once into the
cache from the package registry by `compress runtime prepare`, which `make setup` runs; a run never installs),
at each variant's own tolerance; unmet recipes fail before any work."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

from compress.export import runtimes
from compress.core.errors import InputError
from compress.load.model import load, load_compressed
from compress.run.pipeline import apply
from compress.recipe import ExportSpec, load_recipe
from tests.conftest import CIFAR_TRAIN, REPO, RESNET_TEACHER, VIT_TEACHER, need_shared, run_cli, write_recipe

OLD = runtimes.RUNTIMES["1.16"].release
TOL = {"fp32": 1e-4, "fp16": 1e-2}  # max |Δlogit| relative to the logit scale (recipe defaults); int8: agreement


@pytest.mark.slow  # real-data runs on the shared teachers (the marker's meaning); about 90 s for both
@pytest.mark.parametrize("teacher", [VIT_TEACHER, RESNET_TEACHER], ids=["vit", "resnet"])
def test_every_variant_of_the_shared_teachers_runs_on_onnxruntime_1_16(tmp_path, teacher):
    need_shared(teacher)
    recipe = write_recipe(tmp_path / "r.yaml", (
        f"version: 1\ncalibration: {{data: {need_shared(CIFAR_TRAIN)}, images: 32}}\n"
        "export: {formats: [onnx], precision: [fp32, fp16], quantize: [int8_dynamic, int8_static]}\n"
        "report: {latency: null, eval_data: null}\n"))
    out = tmp_path / "out"
    record = apply(load_recipe(recipe), str(teacher), out, log=lambda _: None)
    old = runtimes.find("1.16")  # the cached venv the run used
    student = load(str(teacher), None).model  # no passes: the student is the teacher, exported four ways
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, *record["input_size"])).astype(np.float32))
    with torch.no_grad():
        ref = student(x).numpy()
    scale = np.abs(ref).max()
    for key, a in record["artifacts"].items():
        variant = key.partition(".")[2] or "fp32"
        ran = {r["onnxruntime"]: r for r in a["runtimes"]}
        assert set(ran) == {runtimes.installed(), OLD} and ran[OLD]["isolated"] and a["oldest_runtime"] == OLD
        y = runtimes.run(old, out / a["path"], a["path"], x.numpy(), threads=1)  # again, on inputs of our own
        if variant in TOL:
            assert np.abs(y - ref).max() <= TOL[variant] * scale, variant
            assert ran[OLD]["rel_diff"] <= TOL[variant]
        else:
            assert ran[OLD]["agreement"] >= 0.9, variant
            assert (y.argmax(1) == ref.argmax(1)).mean() >= 0.75, variant  # 8 noise inputs: a loose bar
    ops = {k: set(a["operators"]) for k, a in record["artifacts"].items()}
    assert "ConvInteger" not in ops["onnx.int8_dynamic"]  # convolutions stay float by default
    dyn = record["artifacts"]["onnx.int8_dynamic"]
    if teacher == VIT_TEACHER:
        assert "MatMulInteger" in ops["onnx.int8_dynamic"] and dyn["int8_weight_share"] > 0.5 and "note" not in dyn
    else:  # a ResNet is convs + one small head: little to quantize by default, and the report says so
        assert dyn["int8_weight_share"] < 0.01 and "mostly in float32" in dyn["note"]
        assert dyn["note"] in (out / "report.md").read_text()
    md = (out / "report.md").read_text()
    assert f"run on onnxruntime {runtimes.installed()}, {OLD} (isolated: " in md
    assert md.count(f"| {OLD} |") == 4  # the variants table: oldest runtime of each file


def _cli(*args, env=None):
    return run_cli(*args, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("export, words", [
    ("{opset: 20}", ["export.opset 20", "onnxruntime 1.16"]),
    ("{quantize: [int8_dynamic], int8_dynamic_convs: true}", ["int8_dynamic", "onnxruntime 1.16", "ConvInteger"]),
])
def test_a_variant_the_runtime_cannot_run_fails_before_any_work(tmp_path, vit_dir, export, words):
    recipe = write_recipe(tmp_path / "r.yaml", f"version: 1\nexport: {export}\nreport: {{latency: null}}\n")
    res = _cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and all(w in line for w in words), line
    assert "load" not in res.stdout and not (tmp_path / "out").exists()


def _offline(tmp_path) -> dict:
    """An empty cache and a pip that can reach no package index."""
    return {"COMPRESS_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "", "PIP_INDEX_URL": ""}


def test_offline_and_not_cached_fails_in_one_line_saying_how_to_prepare(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\nreport: {latency: null}\n")
    res = _cli("apply", recipe, vit_dir, "-o", tmp_path / "out", env=_offline(tmp_path))
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "compress runtime prepare 1.16" in line and "min_runtime_check: warn" in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing was even tried


def test_apply_never_installs_even_where_the_registry_is_reachable(tmp_path, vit_dir, monkeypatch):
    """The network is not cut here: a run that tried pip or venv would get as far as calling them."""
    real = subprocess.run

    def forbid(cmd, *a, **kw):
        assert not any(w in map(str, cmd) for w in ("pip", "venv")), f"apply tried to install: {cmd}"
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", forbid)
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\nreport: {latency: null}\n")
    with pytest.raises(InputError, match=r"not prepared in .*`compress runtime prepare 1\.16`"):
        apply(load_recipe(recipe), str(vit_dir), tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_prepare_is_the_installer_and_says_so_in_one_line_when_offline(tmp_path):
    res = _cli("runtime", "prepare", "1.16", env=_offline(tmp_path))
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "could not be installed" in line and "compress runtime prepare 1.16" in line, line
    assert not list((tmp_path / "cache").iterdir())  # no half-built venv left


def test_prepare_on_a_prepared_cache_installs_nothing(tmp_path):
    """`make setup` runs it every time: where the runtime is there it only says so (no pip, works offline)."""
    home = tmp_path / "cache" / f"ort-{OLD}"
    (home / "bin").mkdir(parents=True)
    (home / ".ready").write_text(OLD + "\n")
    python = home / "bin" / "python"  # a cache is checked by running its python: this one runs and names the release
    python.write_text(f"#!/bin/sh\necho {OLD}\n")
    python.chmod(0o755)
    res = _cli("runtime", "prepare", "1.16", env=_offline(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"onnxruntime {OLD} ready: {home / 'bin' / 'python'}"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"ort-{OLD}"]


def test_make_setup_prepares_the_runtime_apply_needs():
    """CI runs `make test` on a fresh clone: the runtime must come with setup, not with the first apply."""
    plan = subprocess.run(["make", "-n", "setup"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "compress runtime prepare 1.16" in plan
    assert ExportSpec().min_runtime == "1.16"  # the release setup prepares is the default one


def test_warn_skips_the_old_runtime_and_the_report_says_so(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\nexport: {min_runtime_check: warn}\nreport: {latency: null}\n")
    res = _cli("apply", recipe, vit_dir, "-o", tmp_path / "out", env=_offline(tmp_path))
    assert res.returncode == 0, res.stderr
    assert f"will not be run on onnxruntime {OLD}" in res.stdout + res.stderr
    onnx_art = json.loads((tmp_path / "out" / "report.json").read_text())["artifacts"]["onnx"]
    assert onnx_art["oldest_runtime"] == runtimes.installed()
    assert [r["onnxruntime"] for r in onnx_art["runtimes"] if "skipped" in r] == [OLD]
    assert f"**not run on onnxruntime {OLD}**" in (tmp_path / "out" / "report.md").read_text()


def test_min_runtime_null_runs_the_installed_runtime_only(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\nexport: {min_runtime: null, opset: 20}\nreport: {latency: null}\n")
    out = tmp_path / "out"
    record = apply(load_recipe(recipe), str(vit_dir), out, log=lambda _: None)
    assert [r["onnxruntime"] for r in record["artifacts"]["onnx"]["runtimes"]] == [runtimes.installed()]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert load_compressed(out)(x).shape == (2, 5)
