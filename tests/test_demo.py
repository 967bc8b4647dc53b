"""`make demo`: a newcomer's first run states a goal (target:) on the shared ViT, prints the plan table and the
measured result, and exits 0 because the result meets the goal (every figure measured in that run)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from compress.recipe import load_recipe
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN, REPO, VIT_TEACHER, need_shared, run_cli

DEMO = REPO / "recipes" / "vit_plan_demo.yaml"


def test_make_demo_prepares_the_runtime_then_applies_the_goal_recipe():
    steps = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    lines = steps.splitlines()
    prepare = next(i for i, s in enumerate(lines) if "compress runtime prepare 1.16" in s)
    apply = next(i for i, s in enumerate(lines) if "compress apply recipes/vit_plan_demo.yaml" in s)
    assert prepare < apply and "vit_cifar10" in lines[apply]
    r = load_recipe(DEMO)  # the goal the README shows, with a (short) distillation and labelled test images
    assert (r.target.speedup, r.target.batch, r.target.max_top1_drop) == (1.5, 8, 1.0)
    assert r.distill is not None and r.report.eval_data is not None and 8 in r.report.latency.batch_sizes


@pytest.mark.slow  # the real demo on the shared ViT: about a minute on 2 idle cores
@pytest.mark.timed  # its 1.5x speed gate
def test_the_demo_meets_its_goal_and_shows_the_plan(tmp_path):
    data = {"calibration": {"data": str(need_shared(CIFAR_TRAIN))}, "distill": {"data": str(CIFAR_TRAIN)},
            "report": {"eval_data": str(need_shared(CIFAR_TEST))}}  # the paths conftest knows ($COMPRESS_SHARED)
    out = tmp_path / "demo"
    res = run_cli("apply", DEMO, need_shared(VIT_TEACHER), "-o", out, "--override", json.dumps(data),
                  env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    assert "KL held-out" in res.stdout and "speedup b8" in res.stdout  # the plan table, then the result table
    assert "agreement with teacher" in res.stdout and f"wrote {out}/" in res.stdout
    record = json.loads((out / "report.json").read_text())
    assert record["plan"]["choice"] and record["plan"]["table"][0][1] == "candidate"
    gates = {g["gate"].split(" ")[0]: g for g in record["gates"]}  # e.g. "min_speedup (batch 8, p50)"
    assert gates["min_speedup"]["target"] == 1.5 and gates["max_top1_drop"]["target"] == 1.0
    assert all(g["ok"] for g in gates.values()) and "(batch 8" in gates["min_speedup"]["gate"]
