"""Memory at scale: the teacher rewritten in place when nothing reads it later, the PyTorch models freed before
the latency child, checkpoints adopted without a copy, and the harness summing a process tree's RSS."""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import compress.run.pipeline as pipeline
from benchmarks.scale import _tree_rss
from compress.export.write import EXTERNAL_ABOVE, write_onnx
from compress.load.model import load
from compress.measure.metrics import ort_run, ort_session
from compress.export.onnx_lean import light
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.core.rsslog import rss
from tests.conftest import save_timm_dir, tiny_vit, tiny_vit_args

LAT = {"batch_sizes": [1], "threads": 1, "warmup": 1, "runs": 3}


def _recipe(**report):
    return parse_recipe({"version": 1, "passes": [{"lowrank": {"target": 0.7}}], "calibration": {"data": "random"},
                         "report": {"latency": LAT, **report}})


def test_in_place_rewrite_matches_the_copying_one_and_models_are_freed_before_timing(tmp_path, vit_dir, image_zip,
                                                                                       monkeypatch):
    alive = []
    child = pipeline.latency_child

    def timed(*a, **k):  # what still holds a ViT in this process when the timing child starts
        gc.collect()
        alive.append(sum(type(o) is VisionTransformer for o in gc.get_objects()))
        return child(*a, **k)

    monkeypatch.setattr(pipeline, "latency_child", timed)
    copied = apply(_recipe(eval_data=str(image_zip)), str(vit_dir), tmp_path / "copied", log=lambda *_: None)
    inplace = apply(_recipe(), str(vit_dir), tmp_path / "inplace", log=lambda *_: None)
    assert alive == [0, 0]
    a, b = load_file(str(tmp_path / "copied" / "model.safetensors")), load_file(str(tmp_path / "inplace" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same student either way
    c, i = copied["summary"], inplace["summary"]
    assert c["params"] == i["params"] and c["flops"] == i["flops"]  # teacher figures taken before the rewrite
    assert c["onnx_bytes"]["teacher"] == i["onnx_bytes"]["teacher"]
    assert c["safetensors_bytes"]["teacher"] == i["safetensors_bytes"]["teacher"]  # (students' metadata differ)
    assert inplace["summary"]["latency"]["1"]["teacher"]["p50_ms"] > 0 and "latency" in inplace["stages_s"]


def test_timm_checkpoint_is_adopted_without_a_copy_and_other_dtypes_still_load(tmp_path):
    model = tiny_vit()
    folder = save_timm_dir(model, "vit_tiny_patch16_224", tiny_vit_args(), tmp_path / "fp32")
    loaded = load(str(folder)).model
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert all(p.requires_grad for p in loaded.parameters()) and not loaded.training
    half = tmp_path / "fp16"
    save_timm_dir(model, "vit_tiny_patch16_224", tiny_vit_args(), half)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(half / "model.safetensors"))
    again = load(str(half)).model  # fp16 weights into the float32 model: copied and converted, as before
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    assert torch.equal(again.blocks[0].mlp.fc1.weight, model.blocks[0].mlp.fc1.weight.half().float())


def test_tree_rss_sums_a_process_and_its_children():
    code = "b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); print(1, flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # the child has touched its 300 MiB
        child, own, tree = _tree_rss(proc.pid), rss(), _tree_rss(os.getpid())
        assert child >= 300 * 2**20
        assert tree >= 0.95 * (own + child)  # this process, plus its child
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("external", [False, True])
def test_lean_onnx_export_matches_the_plain_one(tmp_path, external):
    model = tiny_vit()
    x = torch.randn(4, 3, 16, 16)
    plain, lean = tmp_path / "plain" / "m.onnx", tmp_path / "lean" / "m.onnx"
    plain.parent.mkdir(), lean.parent.mkdir()
    rec = write_onnx(model, plain, x, opset=17, dynamic_batch=True, tol=1e-4)
    got = write_onnx(model, lean, x, opset=17, dynamic_batch=True, tol=1e-4, lean=True,
                     external_above=1024 if external else EXTERNAL_ABOVE)
    assert got["parity"]["rel_diff"] <= 1e-4 and got["dynamic_batch"]
    assert got["files"] == (["m.onnx", "m.onnx.data"] if external else ["m.onnx"])
    head = onnx.load(str(lean), load_external_data=False)
    assert [i.name for i in head.graph.input] == ["input"]  # the weights are constants, not inputs
    inits = {i.name for i in head.graph.initializer}
    assert len(inits) == len(model.state_dict())
    assert not [n for n in head.graph.node if n.op_type == "Transpose" and n.input[0] in inits]  # folded, as plain is
    y = ort_run(ort_session(lean, 1), x.numpy())
    np.testing.assert_allclose(y, ort_run(ort_session(plain, 1), x.numpy()), rtol=1e-5, atol=1e-5)
    assert abs(got["bytes"] - rec["bytes"]) < 0.1 * rec["bytes"]


def test_light_reads_the_graph_without_the_weights(tmp_path):
    model = tiny_vit()
    path = tmp_path / "m.onnx"
    write_onnx(model, path, torch.randn(2, 3, 16, 16), opset=17, dynamic_batch=True, tol=1e-4)
    full, got = onnx.load(str(path)), light(path)
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert got.ir_version == full.ir_version and got.opset_import == full.opset_import
    assert [(t.name, list(t.dims), t.data_type) for t in got.graph.initializer] == \
        [(t.name, list(t.dims), t.data_type) for t in full.graph.initializer]
    assert not any(t.raw_data or t.float_data for t in got.graph.initializer)
