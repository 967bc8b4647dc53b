"""Chaos: `compress apply` SIGKILLed at 10 seeded random moments and `compress batch` at 6, then rerun as an ops
pipeline would (the same line; --resume where there is something to resume). Every rerun exits 0, its result
passes `compress verify`, and no staging folder, lock or temporary file is left beside OUT or in TMPDIR."""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

from compress.core.locks import is_held
from compress.run.verify import verify
from tests import forkcli
from tests.conftest import REPO, run_cli, save_timm_dir, tiny_vit, tiny_vit_args, write_recipe
from tests.test_outdir import leftovers

KILLS = 10
# each batch rerun boots its own fork server (~5 s of imports): 6 moments kept the suite's longest test under 2 min
BATCH_KILLS = 6
SEED = 31


def _timed(args, env) -> float:
    t0 = time.perf_counter()
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    return time.perf_counter() - t0


def _kill_at(args, env, moment: float, logs: Path) -> None:
    """Start the CLI, SIGKILL it `moment` seconds in (if still running)."""
    proc = forkcli.spawn(args, REPO, env, logs / "out", logs / "err")
    proc.join(moment)
    if proc.exitcode is None:
        proc.kill()
    proc.join()


def _wait_unlocked(folder: Path) -> None:
    """The killed run's children (batch entries: SIGKILLed with their parent) gone: their locks free."""
    deadline = time.time() + 30
    while time.time() < deadline and any(is_held(p) for p in folder.rglob(".*.lock")):
        time.sleep(0.05)


@pytest.mark.slow
def test_apply_killed_at_random_moments_reruns_clean(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n"
                          "report: {latency: null}\n"
                          f"distill: {{data: {image_zip}, steps: 6, batch_size: 4, checkpoint_every: 2, device: cpu}}\n")
    res, tmpdir, logs = tmp_path / "res", tmp_path / "tmp", tmp_path / "logs"
    tmpdir.mkdir(), logs.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    line = ["apply", recipe, vit_dir, "-o", res / "x", "--overwrite"]
    span = _timed(line, env)  # a whole run, for the kill moments
    rng = random.Random(SEED)
    for i in range(KILLS):
        moment = rng.uniform(0, span)
        _kill_at(line, env, moment, logs)
        resume = ["--resume"] if (res / ".x.work" / "distill.pt").is_file() else []
        again = run_cli(*line, *resume, env=env)
        assert again.returncode == 0, f"kill {i} at {moment:.2f} s, rerun {resume}: {again.stderr}"
        assert verify(res / "x", 2)["hashes"] > 0
        assert sorted(p.name for p in res.iterdir()) == ["x"], f"kill {i} at {moment:.2f} s"
        assert leftovers(tmpdir) == [], f"kill {i} at {moment:.2f} s"


@pytest.mark.slow
def test_batch_killed_at_random_moments_resumes_clean(tmp_path):
    for i in range(2):
        save_timm_dir(tiny_vit(seed=i, heads=2), "vit_tiny_patch16_224", tiny_vit_args(heads=2), tmp_path / f"m{i}")
    write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: null}\n")
    zoo = write_recipe(tmp_path / "zoo.yaml", "version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: m0}\n"
                       "  - {checkpoint: m1}\n")
    res, tmpdir, logs = tmp_path / "res", tmp_path / "tmp", tmp_path / "logs"
    tmpdir.mkdir(), logs.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    line = ["batch", zoo, "-o", res / "out", "--jobs", "2", "--resume"]
    span = _timed(line, env)
    rng = random.Random(SEED)
    for i in range(BATCH_KILLS):
        moment = rng.uniform(0, span)
        shutil.rmtree(res, ignore_errors=True)  # each kill lands in a batch with everything still to do
        _kill_at(line, env, moment, logs)
        _wait_unlocked(res)
        again = run_cli(*line, env=env)
        assert again.returncode == 0, f"kill {i} at {moment:.2f} s: {again.stderr}"
        out = res / "out"
        states = {n: e["state"] for n, e in json.loads((out / "manifest.json").read_text())["entries"].items()}
        assert states == {"m0": "done", "m1": "done"}, f"kill {i} at {moment:.2f} s"
        for name in states:
            assert verify(out / name, 2)["hashes"] > 0
        assert sorted(p.name for p in out.iterdir()) == ["m0", "m1", "manifest.json", "summary.json", "summary.md"], \
            f"kill {i} at {moment:.2f} s"
        assert sorted(p.name for p in res.iterdir()) == ["out"] and leftovers(tmpdir) == [], f"kill {i} at {moment:.2f} s"
