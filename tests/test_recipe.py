"""Recipe parsing: shipped recipes parse, unknown keys name their path, the JSON Schema is complete."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from compress.core.errors import InputError
from compress.recipe import load_recipe, parse_recipe
from compress.core.registry import all_passes
from tests.conftest import REPO, run_cli

SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_parses_and_resolves(path: Path):
    r = load_recipe(path)
    resolved = r.resolved()
    assert resolved["version"] == 1
    assert parse_recipe(resolved).resolved() == resolved  # the written recipe.yaml replays identically
    for p in (r.calibration.data, r.report.eval_data):
        assert p is None or p.is_absolute()


def test_unknown_top_level_key_suggests_the_right_one():
    with pytest.raises(InputError, match=r"unknown key 'pases' \(did you mean 'passes'\?\); allowed here: version, name"):
        parse_recipe({"version": 1, "pases": []})


def test_unknown_nested_key_names_the_path():
    with pytest.raises(InputError, match=r"unknown key 'report\.latency\.thread' \(did you mean 'threads'\?\)"):
        parse_recipe({"version": 1, "report": {"latency": {"thread": 2}}})


def test_unknown_pass_option_names_the_pass():
    with pytest.raises(InputError, match=r"unknown key 'passes\[0\]\.mlp_strip\.colour'; allowed here: blocks, fraction"):
        parse_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": [0], "colour": 0.5}}]})


def test_bad_value_names_the_path_and_value():
    with pytest.raises(InputError, match=r"passes\[0\]\.qk_merge\.mode: Input should be 'exact' or 'symmetric' \(got 'sideways'\)"):
        parse_recipe({"version": 1, "passes": [{"qk_merge": {"mode": "sideways"}}]})


def test_schema_command_lists_every_pass():
    res = run_cli("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    names = {next(iter(o["properties"])) for o in schema["properties"]["passes"]["items"]["oneOf"]}
    assert names == set(all_passes())
    assert schema["additionalProperties"] is False
    assert "version" in schema["required"]


@pytest.mark.parametrize("export, says", [
    ("{quantize: [int8_static], int8_max_kl: 0.01, int8_max_disagreement: 0.01}", "set one"),
    ("{quantize: [int8_static], int8_max_disagreement: 1.5}", "export.int8_max_disagreement: Input should be less than 1"),
    ("{quantize: [int8_static], int8_qat_steps: -3}", "export.int8_qat_steps: Input should be greater than or equal to 0"),
    ("{quantize: [int8_dynamic], int8_qat_steps: 5}", "for the int8_static file, which is not exported"),
    ("{quantize: [], int8_qat_steps: 5}\ntarget: {flops: 0.5, variants: [fp32]}", "which is not exported"),
    ("{quantize: [int8_static], int8_qat_steps: 5, int8_max_kl: 0.1}", "add a distill: section or set it to 0"),
    ("{quantize: [int8_static], int8_qat_steps: 5}\ndistill: {steps: 1}", "needs a bound to aim for"),
])
def test_int8_control_fields_are_checked(tmp_path, export, says):
    """The int8 accuracy-control fields: a bad value is one line naming the key and the fix, exit 2."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nexport: {export}\n")
    res = run_cli("apply", recipe, "timm:no_such_model", "-o", tmp_path / "out")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: recipe: ") and says in lines[0], res.stderr
    assert not (tmp_path / "out").exists()
