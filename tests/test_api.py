"""The public Python API (compress/api.py, docs/python-api.md): a recipe built in Python runs on the shared ViT, the
module `load_compressed` returns computes what the written ONNX computes, and errors are the CLI's, exit codes
included."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import compress
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN, REPO, VIT_TEACHER, need_shared, run_cli, write_recipe


def _recipe(**extra) -> "compress.Recipe":
    """Strip the MLP of two blocks (no training, no timing): the cheapest run that changes the structure, so the
    module rebuilt from the files must replay the pass to load."""
    return compress.Recipe(version=1, name="api", passes=[{"mlp_strip": {"blocks": [2, 3]}}],
                           calibration={"data": str(need_shared(CIFAR_TRAIN)), "images": 8},
                           report={"eval_data": str(need_shared(CIFAR_TEST)), "eval_images": 32, "latency": None},
                           **extra)


def test_import_compress_is_cheap_and_the_api_loads_on_first_use():
    code = "import sys, compress; print(sorted(m for m in ('torch', 'compress.api', 'compress.cli') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    from compress import api

    assert {"plan", "load_compressed", "Recipe", "CompressError"} <= set(compress.__all__) <= set(dir(compress))
    assert compress.plan is api.plan and compress.apply is api.apply  # a function, not the planner/ subpackage
    with pytest.raises(AttributeError, match="no attribute 'aply'"):
        compress.aply


def test_a_recipe_built_in_python_applies_and_loads_back_as_the_onnx_computes(tmp_path):
    lines = []
    out = tmp_path / "out"
    record = compress.apply(_recipe(), need_shared(VIT_TEACHER), out, log=lines.append)
    assert record["summary"]["params"]["ratio"] < 1 and any(s.startswith("load:") for s in lines)
    assert (out / "model.onnx").is_file() and (out / "recipe.yaml").is_file()

    model = compress.load_compressed(out)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert sum(p.numel() for p in model.parameters()) == record["summary"]["params"]["student"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()

    assert compress.verify(out)["parity"]["rel_diff"] <= 1e-4  # the CLI's verify, from Python
    with pytest.raises(compress.InputError) as e:  # the CLI's refusal to replace a result without overwrite
        compress.apply(_recipe(), VIT_TEACHER, out)
    assert e.value.exit_code == 2 and "--overwrite" in str(e.value)


def test_a_bad_recipe_field_raises_the_line_the_cli_prints(tmp_path):
    bad = tmp_path / "bad.yaml"
    write_recipe(bad, "version: 1\npasses:\n  - mlp_strip: {blocks: [2], fractoin: 0.5}\n")
    res = run_cli("apply", bad, need_shared(VIT_TEACHER), "-o", tmp_path / "out")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: recipe: unknown key 'passes[0].mlp_strip.fractoin' (did you mean 'fraction'?)")
    for build in (lambda: compress.Recipe(version=1, passes=[{"mlp_strip": {"blocks": [2], "fractoin": 0.5}}]),
                  lambda: compress.load_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": [2], "fractoin": 0.5}}]}),
                  lambda: compress.load_recipe(bad),
                  lambda: compress.apply(bad, VIT_TEACHER, tmp_path / "out")):
        with pytest.raises(compress.InputError) as e:
            build()
        assert f"error: {e.value}" == line and e.value.exit_code == 2
    with pytest.raises(compress.InputError, match=r"^recipe: export.opset: Input should be less than or equal to 21"):
        compress.Recipe(version=1, export={"opset": 99})


def test_errors_carry_the_cli_exit_codes(tmp_path):
    assert issubclass(compress.InputError, compress.CompressError)
    assert (compress.InputError.exit_code, compress.VerificationError.exit_code, compress.GateError.exit_code,
            compress.TargetError.exit_code) == (2, 3, 4, 4)
    with pytest.raises(compress.InputError, match="no target: section to plan for") as e:
        compress.plan({"version": 1}, VIT_TEACHER)
    assert e.value.exit_code == 2
    with pytest.raises(compress.InputError, match="--device 'tpu': use auto, cpu or cuda"):
        compress.apply({"version": 1}, VIT_TEACHER, tmp_path / "x", device="tpu")
    with pytest.raises(compress.GateError) as e:  # a missed gate: exit 4, the measured record kept, nothing published
        compress.apply(_recipe(gates={"max_params_ratio": 0.5}), need_shared(VIT_TEACHER), tmp_path / "gated",
                       log=lambda m: None)
    assert e.value.exit_code == 4 and "gate max_params_ratio missed" in str(e.value)
    assert e.value.record["failed_gates"][0]["gate"] == "max_params_ratio" and not (tmp_path / "gated").exists()
    (tmp_path / "gated").mkdir()
    with pytest.raises(compress.VerificationError) as e:
        (tmp_path / "gated" / "report.json").write_text("[]")
        compress.verify(tmp_path / "gated")
    assert e.value.exit_code == 3
