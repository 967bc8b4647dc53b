"""ONNX above protobuf's 2 GiB: weights in model.onnx.data beside model.onnx; a small model forced there round-trips."""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from compress.run.batch import verified
from compress.export.write import write_fp16, write_int8, write_onnx
from compress.measure.metrics import ort_run, ort_session
from tests.conftest import run_cli, tiny_vit, write_recipe

RECIPE = ("version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nexport: {external_data_mb: 0}\n"
          "report: {latency: {batch_sizes: [1], runs: 2, warmup: 0}}\n")


def test_forced_external_data_round_trips_and_moves_with_its_graph(tmp_path):
    model = tiny_vit()
    calib = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "a").mkdir()
    art = write_onnx(model, tmp_path / "a" / "model.onnx", calib, opset=18, dynamic_batch=True, tol=1e-4, slim=True,
                     external_above=0)
    assert art["files"] == ["model.onnx", "model.onnx.data"] and art["external_data"]["path"] == "model.onnx.data"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.onnx", "model.onnx.data"]  # nothing else left
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()}
    assert art["bytes"] == sum(sizes.values()) and sizes["model.onnx.data"] == art["external_data"]["bytes"] > sizes["model.onnx"]
    assert art["parity"]["rel_diff"] <= 1e-4
    shutil.move(tmp_path / "a", tmp_path / "b")  # the data file is found relative to the graph
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(ort_run(ort_session(tmp_path / "b" / "model.onnx", 1), x.numpy()), ref, rtol=1e-4, atol=1e-4)

    small = write_onnx(model, tmp_path / "b" / "model.onnx", calib, opset=18, dynamic_batch=True, tol=1e-4)
    assert small["files"] == ["model.onnx"] and small["external_data"] is None  # below the threshold: one file
    assert not (tmp_path / "b" / "model.onnx.data").exists()  # and no stale data file beside it


def test_fp16_and_int8_variants_go_external_above_the_threshold(tmp_path):
    model = tiny_vit()
    calib = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    (tmp_path / "a").mkdir()
    write_onnx(model, tmp_path / "a" / "model.onnx", calib, opset=18, dynamic_batch=True, tol=1e-4, slim=True,
               external_above=0)  # slimmed, as export.slim does by default
    with torch.no_grad():
        ref = model(calib)
    fp16 = write_fp16(tmp_path / "a" / "model.onnx", tmp_path / "a" / "model.fp16.onnx", ref, calib, tol=1e-2,
                      external_above=0)
    int8 = write_int8(tmp_path / "a" / "model.onnx", tmp_path / "a" / "model.int8_dynamic.onnx", "int8_dynamic", ref,
                      calib, min_agreement=0.0, external_above=0)
    for art, name in ((fp16, "model.fp16.onnx"), (int8, "model.int8_dynamic.onnx")):
        assert art["files"] == [name, name + ".data"] and art["external_data"]["path"] == name + ".data"
        assert art["bytes"] == sum((tmp_path / "a" / f).stat().st_size for f in art["files"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        ["model.onnx", "model.onnx.data", *fp16["files"], *int8["files"]])  # no private folder or tmp file left
    assert fp16["parity"]["rel_diff"] <= 1e-2
    shutil.move(tmp_path / "a", tmp_path / "b")  # each variant finds its own data file relative to its graph
    for art in (fp16, int8):
        got = torch.from_numpy(ort_run(ort_session(tmp_path / "b" / art["path"], 1), calib.numpy()))
        assert torch.allclose(got, ref, atol=0.1 * float(ref.abs().max()))

    small = write_fp16(tmp_path / "b" / "model.onnx", tmp_path / "b" / "model.fp16.onnx", ref, calib, tol=1e-2)
    assert small["files"] == ["model.fp16.onnx"] and small["external_data"] is None  # below the threshold: one file
    assert not (tmp_path / "b" / "model.fp16.onnx.data").exists()  # and no stale data file beside it
    small = write_int8(tmp_path / "b" / "model.onnx", tmp_path / "b" / "model.int8_dynamic.onnx", "int8_dynamic", ref,
                       calib, min_agreement=0.0)
    assert small["files"] == ["model.int8_dynamic.onnx"] and not (tmp_path / "b" / "model.int8_dynamic.onnx.data").exists()


def test_apply_and_batch_count_and_hash_the_data_file(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", RECIPE)
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    onnx = rep["artifacts"]["onnx"]
    assert onnx["files"] == ["model.onnx", "model.onnx.data"]
    assert onnx["bytes"] == sum((tmp_path / "out" / f).stat().st_size for f in onnx["files"])
    assert rep["summary"]["onnx_bytes"]["student"] == onnx["bytes"]  # size comparisons count both files
    assert "model.onnx + model.onnx.data" in (tmp_path / "out" / "report.md").read_text()
    assert "1" in rep["summary"]["latency"]  # onnxruntime timed the pair

    zoo = write_recipe(tmp_path / "zoo.yaml", f"version: 1\nrecipe: r.yaml\nentries:\n  - {{checkpoint: {vit_dir}, name: v}}\n")
    assert run_cli("batch", zoo, "-o", tmp_path / "batch").returncode == 0
    entry = json.loads((tmp_path / "batch" / "manifest.json").read_text())["entries"]["v"]
    assert {"model.onnx", "model.onnx.data"} <= set(entry["files"]) and verified("v", entry, tmp_path / "batch")
    assert run_cli("verify", tmp_path / "batch" / "v").returncode == 0  # compress verify: both files, and parity
    (tmp_path / "batch" / "v" / "model.onnx.data").write_bytes(b"changed")
    assert not verified("v", entry, tmp_path / "batch")  # a changed data file makes the entry redo on --resume
    res = run_cli("verify", tmp_path / "batch" / "v")
    assert res.returncode == 3 and "model.onnx.data changed" in res.stderr, res.stderr
