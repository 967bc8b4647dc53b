"""Edge export: fp16 and int8 ONNX variants, each verified against PyTorch; failures publish nothing."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from compress.core.errors import VerificationError
from compress.export.write import _graph
from compress.load.model import load_compressed
from tests.conftest import run_cli, write_recipe

TOL = {"fp32": 1e-4, "fp16": 1e-2}  # max |Δlogit| relative to the logit scale, as the recipe defaults state


def _recipe(image_zip, export: str, extra: str = "") -> str:
    return ("version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n"
            f"calibration: {{data: {image_zip}, images: 24}}\nexport: {export}\n"
            f"report: {{latency: {{batch_sizes: [1, 4], threads: 1, warmup: 1, runs: 3}}, eval_data: {image_zip}}}\n" + extra)


def test_every_variant_written_verified_and_reported(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(
        image_zip, "{precision: [fp32, fp16], quantize: [int8_dynamic, int8_static], int8_min_agreement: 0.5}"))
    out = tmp_path / "out"
    res = run_cli("apply", recipe, vit_dir, "-o", out)
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    arts = rep["artifacts"]
    assert set(arts) == {"safetensors", "safetensors.fp16", "onnx", "onnx.fp16", "onnx.int8_dynamic", "onnx.int8_static"}
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        ref = load_compressed(out)(x).numpy()
    scale = np.abs(ref).max()
    for key, a in arts.items():
        path = out / a["path"]
        assert path.stat().st_size == a["bytes"]
        if not key.startswith("onnx"):
            continue
        assert a["parity"]["images"] == 24
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert y.shape == ref.shape and y.dtype == np.float32  # fp32 input and output for every variant
        prec = key.partition(".")[2] or "fp32"
        if prec in TOL:
            assert np.abs(y - ref).max() <= TOL[prec] * scale, prec
            assert a["parity"]["rel_diff"] <= TOL[prec]
        else:
            assert a["parity"]["agreement"] >= 0.5
    ops = {k: set(a["operators"]) for k, a in arts.items() if k.startswith("onnx")}
    assert "Cast" in ops["onnx.fp16"] and "MatMulInteger" in ops["onnx.int8_dynamic"]
    assert "QuantizeLinear" in ops["onnx.int8_static"]
    sizes = {k: a["bytes"] for k, a in arts.items()}
    assert sizes["onnx.fp16"] < sizes["onnx"] and sizes["onnx.int8_dynamic"] < sizes["onnx"]  # tiny: graph overhead dominates
    assert sizes["safetensors.fp16"] < 0.6 * sizes["safetensors"]
    ev = rep["summary"]["eval"]
    assert set(ev["variants"]) == {"fp16", "int8_dynamic", "int8_static"}
    assert all(0 <= v["top1"] <= 1 for v in ev["variants"].values())
    assert set(rep["summary"]["latency"]["4"]["variants"]) == {"fp16", "int8_dynamic", "int8_static"}
    md = (out / "report.md").read_text()
    assert "## ONNX variants" in md and "`model.int8_dynamic.onnx`" in md
    assert "ONNX variant" in res.stdout


def test_variant_failing_parity_is_not_written(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(image_zip, "{precision: [fp32, fp16], fp16_tol: 1.0e-12}"))
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 3
    line = res.stderr.strip()
    assert line.startswith("error: model.fp16.onnx: onnxruntime differs from PyTorch by") and "not written" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_int8_static_needs_real_calibration_images(tmp_path, vit_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\nexport: {quantize: int8_static}\n")
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 2 and "int8_static calibrates on real images" in res.stderr


def test_slimming_shrinks_the_graph_and_can_be_turned_off(tmp_path, vit_dir, image_zip):
    nodes = {}
    for slim in ("true", "false"):
        recipe = write_recipe(tmp_path / f"r{slim}.yaml", _recipe(image_zip, f"{{slim: {slim}}}").replace(
            "latency: {batch_sizes: [1, 4], threads: 1, warmup: 1, runs: 3}, ", "latency: null, "))
        res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / slim)
        assert res.returncode == 0, res.stderr
        a = json.loads((tmp_path / slim / "report.json").read_text())["artifacts"]["onnx"]
        nodes[slim] = a["nodes"]
        assert (a["slim"] is not None) == (slim == "true")
    assert nodes["true"] < nodes["false"]


def test_training_only_nodes_are_refused(tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    ratio = helper.make_tensor("ratio", TensorProto.FLOAT, [], [0.5])
    mode = helper.make_tensor("mode", TensorProto.BOOL, [], [True])
    node = helper.make_node("Dropout", ["input", "ratio", "mode"], ["logits"], name="drop")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [ratio, mode]))
    path = tmp_path / "m.onnx.tmp"
    onnx.save(model, str(path))
    with pytest.raises(VerificationError, match="training-only nodes left in the graph \\(drop\\)"):
        _graph(path)
    assert not path.exists()


def test_fixed_batch_export(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(image_zip, "{dynamic_batch: false, quantize: int8_dynamic}"))
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("model.onnx", "model.int8_dynamic.onnx"):
        dims = onnx.load(str(tmp_path / "out" / name)).graph.input[0].type.tensor_type.shape.dim
        assert [d.dim_value for d in dims] == [1, 3, 16, 16]
    assert rep["artifacts"]["onnx"]["parity"]["images"] == 1
    assert set(rep["summary"]["latency"]) == {"1"}  # a fixed-batch graph is timed at batch 1 only
    assert rep["summary"]["eval"]["variants"]["int8_dynamic"]["top1"] >= 0  # evaluated image by image


def _static_untimed(tmp_path, vit_dir, image_zip, export: str, accuracy: str):
    """An int8_static run gated on that file's top-1 drop (100 points: the record is the point), untimed."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(
        image_zip, f"{{quantize: [int8_static], {export}}}",
        f"gates: {{variant: int8_static, max_top1_drop: 100, accuracy: {accuracy}}}\n").replace(
        "latency: {batch_sizes: [1, 4], threads: 1, warmup: 1, runs: 3}", "latency: null"))
    out = tmp_path / "out"
    res = run_cli("apply", recipe, vit_dir, "-o", out)
    assert res.returncode == 0, res.stderr
    return out, res


def test_int8_max_kl_runs_the_accuracy_control_on_held_out_images(tmp_path, vit_dir, image_zip):
    """export.int8_max_kl through the CLI: the static file's record and report say which calibration method won,
    on how many held-out images (the fixture's zip holds one unreadable image), and the file's KL against the
    bound; the accuracy gate reads the int8 file's interval."""
    out, res = _static_untimed(tmp_path, vit_dir, image_zip, "int8_min_agreement: 0.5, int8_max_kl: 10.0", "interval")
    rep = json.loads((out / "report.json").read_text())
    ctl = rep["artifacts"]["onnx.int8_static"]["accuracy_control"]
    assert 20 <= ctl["held_out_images"] <= 24 and set(ctl["methods_kl"]) == {"minmax", "entropy", "percentile"}
    # a bound the plain file meets: no layer is ranked (tests/test_quant.py keeps an outlier layer float)
    assert ctl["meets"] and ctl["kept_float"] == [] and ctl["kl"] == min(ctl["methods_kl"].values())
    assert (ctl["metric"], ctl["source"]) == ("kl", "export.int8_max_kl")  # explicit: wins over max_top1_drop's
    line = "int8_static: bound kl <= 10 from export.int8_max_kl; calibration"
    assert f"int8 accuracy control: {line[13:]}" in (out / "report.md").read_text() and f"export: {line}" in res.stdout
    (gate,) = rep["gates"]
    drop = rep["summary"]["eval"]["intervals"]["int8_static"]["drop"]
    assert gate["basis"] == "interval" and gate["measured"] == drop["hi"] and gate["interval"] == [drop["lo"], drop["hi"]]


def test_max_top1_drop_bounds_the_int8_file_without_int8_max_kl(tmp_path, vit_dir, image_zip):
    """No export.int8_max_kl: gates.max_top1_drop D bounds the static file's disagreement with model.onnx at
    QUANT_SHARE x D %; the record, the log and report.md say the bound and where it came from."""
    from compress.export.quant import QUANT_SHARE

    out, res = _static_untimed(tmp_path, vit_dir, image_zip, "int8_min_agreement: 0.5", "point")
    ctl = json.loads((out / "report.json").read_text())["artifacts"]["onnx.int8_static"]["accuracy_control"]
    assert ctl["metric"] == "disagreement" and ctl["bound"] == pytest.approx(QUANT_SHARE)
    assert "gates.max_top1_drop 100" in ctl["source"] and ctl["meets"] == (ctl["disagreement"] <= ctl["bound"])
    assert "bound disagreement <= 0.5 from 0.5 x gates.max_top1_drop" in (out / "report.md").read_text()
    assert "used: ptq" in res.stdout


def test_int8_qat_steps_through_the_cli(tmp_path, vit_dir, image_zip):
    """export.int8_qat_steps after distillation: a KL bound the plain static file misses starts the QAT fine-tune;
    report.json, report.md and the log say which file ships (ptq or qat N steps) with the KL before and after."""
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(
        image_zip, "{quantize: [int8_static], int8_min_agreement: 0.5, int8_max_kl: 1.0e-9, int8_qat_steps: 3}",
        f"distill: {{data: {image_zip}, steps: 2, batch_size: 8, workers: 0, holdout_images: 0, device: cpu}}\n").replace(
        "latency: {batch_sizes: [1, 4], threads: 1, warmup: 1, runs: 3}", "latency: null"))
    out = tmp_path / "out"
    res = run_cli("apply", recipe, vit_dir, "-o", out)
    assert res.returncode == 0, res.stderr
    ctl = json.loads((out / "report.json").read_text())["artifacts"]["onnx.int8_static"]["accuracy_control"]
    qat = ctl["qat"]
    assert ctl["plain_kl"] > 1e-9 and qat["steps"] == 3 and qat["used"] in ("ptq", "qat 3 steps")
    assert {"kl", "disagreement", "kept_float", "meets"} <= set(qat["before"]) == set(qat["after"])
    assert f"used: {qat['used']} (before: ptq kl " in (out / "report.md").read_text()
    assert "quantization-aware fine-tune, 3 steps" in res.stdout and f"used: {qat['used']}" in res.stdout
    assert not list(out.glob(".qat-*")) and not list(out.glob("*.tmp*"))  # the QAT work files are gone
