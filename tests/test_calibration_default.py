"""Calibration data: any images the run is given are the calibration images; with none, data-fitted passes refuse
unless random inputs are asked for, and agreement on them is never presented as a fidelity figure."""
from __future__ import annotations

import json

import pytest
import yaml

from compress.core.errors import InputError
from compress.recipe import load_recipe, parse_recipe
from compress.run.pipeline import apply
from tests.conftest import make_image_zip, run_cli, write_recipe

LOWRANK = "version: 1\npasses:\n  - lowrank: {rank: 8, layers: [mlp]}\n"
FAST = "export: {formats: [safetensors]}\nreport: {latency: null}\n"


def test_distill_data_is_the_calibration_data_by_default(tmp_path, vit_dir):
    """Before: calibration was 16 random N(0,1) inputs whenever calibration.data was absent."""
    data = make_image_zip(tmp_path / "train.zip", corrupt=0)
    recipe = parse_recipe({"version": 1, "passes": [{"lowrank": {"rank": 8, "layers": ["mlp"]}}],
                           "calibration": {"images": 8},
                           "distill": {"data": str(data), "steps": 1, "batch_size": 4, "workers": 0,
                                       "checkpoint_every": None, "device": "cpu"},
                           "export": {"formats": ["safetensors"]}, "report": {"latency": None}})
    rep = apply(recipe, str(vit_dir), tmp_path / "out", log=lambda *_: None)
    assert rep["calibration"] == f"8 images from {data}" and "calibration_random" not in rep
    assert "not a fidelity figure" not in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("passes, named", [
    ("  - width: {keep: 0.5}\n", "width (it ranks channels"),
    ("  - lowrank: {rank: 8}\n", "lowrank (method whitened_svd"),
    ("  - tie_rowcol: {}\n", "tie_rowcol ("),
    ("  - vo: {mode: remove}\n", "vo (mode remove"),
    ("  - mlp_strip: {blocks: auto, fraction: 0.5}\n", "mlp_strip (blocks: auto"),
])
def test_data_fitted_passes_refuse_without_images(passes, named):
    r = parse_recipe({"version": 1, **yaml.safe_load("passes:\n" + passes)})
    with pytest.raises(InputError, match="no calibration images") as e:
        r.check_calibration(None)
    assert named in str(e.value) and "calibration: {data: random}" in str(e.value)
    r.check_calibration("images.zip")  # --data: fine


def test_exact_passes_svd_and_target_without_images():
    parse_recipe({"version": 1, "passes": [{"lowrank": {"rank": 8, "method": "svd"}}, {"vo": {"mode": "fold"}},
                                           {"mlp_strip": {"blocks": [0]}}]}).check_calibration(None)
    with pytest.raises(InputError, match=r"target \(the planner"):
        parse_recipe({"version": 1, "target": {"flops": 0.5}, "report": {"latency": None}}).check_calibration(None)


def test_refusal_is_one_line_exit_2_and_random_opt_in_is_labelled(tmp_path, vit_dir):
    res = run_cli("apply", write_recipe(tmp_path / "r.yaml", LOWRANK + FAST), vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and res.stderr.startswith("error: no calibration images")
    assert not (tmp_path / "out").exists()
    recipe = load_recipe(write_recipe(tmp_path / "r2.yaml", LOWRANK + "calibration: {data: random, images: 8}\n" + FAST))
    apply(recipe, str(vit_dir), tmp_path / "out2", log=lambda *_: None)
    rep = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert rep["calibration_random"] and rep["recipe"]["calibration"]["random"]
    md = (tmp_path / "out2" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 0 | lowrank"))
    assert "agreement" in row and "on random inputs, not a fidelity figure" in row
