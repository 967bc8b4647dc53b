"""`compress batch`: broken entries never stop good ones; --resume redoes only what is not done and verified."""
from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from compress.run.batch import shard_of, verified
from tests.conftest import FAST, REPO, run_cli, save_timm_dir, tiny_vit, tiny_vit_args, write_recipe

RECIPE = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n" + FAST
UNTIMED = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: null}\n"  # no timing child per entry


def _zoo(tmp_path, n_good=3, broken=True, recipe=RECIPE):
    for i in range(n_good):
        save_timm_dir(tiny_vit(seed=i, heads=2), "vit_tiny_patch16_224", tiny_vit_args(heads=2), tmp_path / f"m{i}")
    write_recipe(tmp_path / "r.yaml", recipe)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    entries = [f"  - {{checkpoint: m{i}}}" for i in range(n_good)]
    args = tiny_vit_args(heads=2)
    model = json.dumps({"arch": "timm:vit_tiny_patch16_224", "num_classes": args.pop("num_classes"),
                        "img_size": args.pop("img_size"), "kwargs": args})
    if broken:
        entries += [f"  - {{checkpoint: broken.safetensors, name: broken, overrides: {{model: {model}}}}}",
                    "  - {checkpoint: m0, name: badpass, overrides: {passes: [{mlp_strip: {blocks: [9]}}]}}"]
    return write_recipe(tmp_path / "zoo.yaml", "version: 1\nrecipe: r.yaml\nentries:\n" + "\n".join(entries) + "\n")


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())["entries"]


def _no_partial_files(out):
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_broken_entries_fail_alone_and_resume_converts_only_the_fixed_one(tmp_path):
    zoo, out = _zoo(tmp_path), tmp_path / "out"
    res = run_cli("batch", zoo, "-o", out, "--jobs", "2")
    assert res.returncode == 5
    m = _manifest(out)
    assert {n: e["state"] for n, e in m.items()} == {"m0": "done", "m1": "done", "m2": "done",
                                                     "broken": "failed", "badpass": "failed"}
    for n in ("m0", "m1", "m2"):
        assert verified(n, m[n], out) and (out / n / "model.onnx").is_file()
    assert m["broken"]["error"].startswith("error: cannot read") and "broken.safetensors" in m["broken"]["error"]
    assert m["badpass"]["error"] == ("error: recipe passes[0]: mlp_strip.blocks: index 9 is out of range; "
                                     "this model has 2 blocks (0..1)")
    assert not (out / "broken").exists() and not (out / "badpass").exists()
    summary = (out / "summary.md").read_text()
    assert "| m0 | done | -" in summary and "| broken | failed |" in summary
    assert res.stderr.strip().splitlines()[-1] == "error: 2 of 5 entries failed: broken, badpass"
    assert json.loads((out / "summary.json").read_text())["entries"]["m1"]["result"]["params_ratio"] < 1
    _no_partial_files(out)

    # fix one input: the broken checkpoint becomes a real one
    save_timm_dir(tiny_vit(seed=9, heads=2), "vit_tiny_patch16_224", tiny_vit_args(heads=2), tmp_path / "fixed")
    (tmp_path / "broken.safetensors").write_bytes((tmp_path / "fixed" / "model.safetensors").read_bytes())
    stamp = {n: (out / n / "model.onnx").stat().st_mtime_ns for n in ("m0", "m1", "m2")}
    res = run_cli("batch", zoo, "-o", out, "--resume")
    assert res.returncode == 5  # badpass is still broken
    assert "batch: 2 of 5 entries to run" in res.stdout
    m = _manifest(out)
    assert m["broken"]["state"] == "done" and m["broken"]["attempts"] == 2 and verified("broken", m["broken"], out)
    assert m["badpass"]["state"] == "failed"
    assert {n: (out / n / "model.onnx").stat().st_mtime_ns for n in stamp} == stamp  # the good ones were not redone
    assert all(m[n]["attempts"] == 1 for n in stamp)


def test_resume_redoes_an_entry_whose_files_changed(tmp_path):
    zoo, out = _zoo(tmp_path, n_good=2, broken=False, recipe=UNTIMED), tmp_path / "out"
    assert run_cli("batch", zoo, "-o", out).returncode == 0
    with open(out / "m0" / "model.onnx", "ab") as f:
        f.write(b"corruption")
    res = run_cli("batch", zoo, "-o", out, "--resume")
    assert res.returncode == 0 and "batch: 1 of 2 entries to run" in res.stdout
    assert verified("m0", _manifest(out)["m0"], out)


def test_without_a_forkserver_entries_run_as_python_m_compress(tmp_path, monkeypatch):
    """Where multiprocessing has no forkserver (not POSIX), each entry is a fresh `python -m compress apply`: the same
    manifest, files and error lines (forked entries are what every other test here runs)."""
    from compress.cli import main
    from compress.run import batch, forkrun

    monkeypatch.setattr(forkrun, "available", lambda: False)
    zoo, out = _zoo(tmp_path, n_good=1, recipe=UNTIMED), tmp_path / "out"
    summary = batch.run_batch(zoo, out, entry=main, jobs=1, resume=False, log=lambda m: None)
    states = {n: e["state"] for n, e in summary["entries"].items()}
    assert states == {"m0": "done", "broken": "failed", "badpass": "failed"}
    assert verified("m0", _manifest(out)["m0"], out) and _manifest(out)["badpass"]["error"].startswith("error: recipe passes[0]")
    _no_partial_files(out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the staging folder is gone


def test_kill_batch_then_resume_leaves_nothing_partial(tmp_path):
    zoo, out = _zoo(tmp_path, n_good=2), tmp_path / "out"  # killed while m1 runs; the resume does m1 and the failing two
    proc = subprocess.Popen([sys.executable, "-m", "compress", "batch", str(zoo), "-o", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        m = (out / "manifest.json").is_file() and _manifest(out)
        if m and any(e.get("state") == "done" for e in m.values()) and any(e.get("state") == "running" for e in m.values()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    time.sleep(1)  # the running child dies with its batch (its death pipe, compress/run/forkrun.py)
    m = _manifest(out)
    states = [e["state"] for e in m.values()]
    assert "running" in states and "done" in states
    for name, e in m.items():  # whatever exists now is either verified or never published
        if (out / name).is_dir() and e["state"] == "done":
            assert verified(name, e, out)

    res = run_cli("batch", zoo, "-o", out, "--resume")
    assert res.returncode == 5
    m = _manifest(out)
    assert [n for n, e in m.items() if e["state"] == "done"] == ["m0", "m1"]
    assert all(verified(n, m[n], out) for n in ("m0", "m1"))
    _no_partial_files(out)


@pytest.mark.parametrize("text,expect", [
    ("version: 1\nentries: []\n", "entries: List should have at least 1 item"),
    ("version: 1\nentries:\n  - {checkpoint: a, recipe: r.yaml, nmae: x}\n", "unknown key 'entries.nmae' (did you mean 'name'?)"),
    ("version: 1\nentries:\n  - {checkpoint: a}\n", "entries[0] names no recipe"),
    ("version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: a, name: x}\n  - {checkpoint: b, name: x}\n", "name 'x' is used twice"),
    ("version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: a, name: ../escape}\n", "entries[0].name: String should match pattern"),
    # the second entries: list would silently replace the first: half the zoo never converted, exit 0
    ("version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: a}\nentries:\n  - {checkpoint: b}\n",
     "duplicate key 'entries' (lines 3 and 5)"),
])
def test_bad_zoo_files(tmp_path, text, expect):
    zoo = write_recipe(tmp_path / "zoo.yaml", text)
    res = run_cli("batch", zoo, "-o", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and expect in res.stderr
    assert not (tmp_path / "out").exists()


SHARD_NAMES = [f"model-{i}" for i in range(40)] + ["vit_base", "resnet50", "deit.s"]
SHARD_COUNTS = [1, 2, 3, 4, 5]


@pytest.fixture(scope="module")
def shards_elsewhere() -> dict:
    """shard_of for every count, as another process (task) with another hash seed computes it: one python for all."""
    code = (f"from compress.run.batch import shard_of; "
            f"print({{n: [shard_of(m, n) for m in {SHARD_NAMES!r}] for n in {SHARD_COUNTS!r}}})")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.returncode == 0, other.stderr
    return ast.literal_eval(other.stdout)


@pytest.mark.parametrize("n", SHARD_COUNTS)
def test_shards_hold_every_entry_exactly_once(n, shards_elsewhere):
    names = SHARD_NAMES
    shards = [[m for m in names if shard_of(m, n) == i] for i in range(n)]
    assert sorted(m for s in shards for m in s) == sorted(names)  # each exactly once
    assert shards_elsewhere[n] == [shard_of(m, n) for m in names]  # another process (task) agrees


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_is_one_line(tmp_path, text):
    res = run_cli("batch", _zoo(tmp_path, n_good=1, broken=False), "-o", tmp_path / "out", "--shard", text)
    assert res.returncode == 2 and "--shard" in res.stderr and "0 <= i < n" in res.stderr
    assert not (tmp_path / "out").exists()


def test_shards_in_parallel_then_merge_equal_the_unsharded_batch(tmp_path):
    zoo = _zoo(tmp_path, n_good=3, recipe=UNTIMED)  # 3 good entries and 2 failing ones; the files are the point
    whole = run_cli("batch", zoo, "-o", tmp_path / "whole", "--jobs", "2")
    assert whole.returncode == 5, whole.stderr
    n = 3
    with ThreadPoolExecutor(n) as pool:  # the shards run at the same time, each its own process
        shards = list(pool.map(lambda i: run_cli("batch", zoo, "-o", tmp_path / f"s{i}", "--shard", f"{i}/{n}"), range(n)))
    assert all(p.returncode in (0, 5) for p in shards), [p.stderr for p in shards]
    shard_names = [set(_manifest(tmp_path / f"s{i}")) for i in range(n)]
    assert sum(len(s) for s in shard_names) == 5 and set().union(*shard_names) == set(_manifest(tmp_path / "whole"))

    merged = tmp_path / "merged"
    res = run_cli("batch", "--merge", *[tmp_path / f"s{i}" for i in range(n)], "-o", merged)
    assert res.returncode == 5 and "2 of 5 entries failed" in res.stderr, res.stderr
    a, b = _manifest(tmp_path / "whole"), _manifest(merged)
    assert list(a) == list(b)  # zoo order
    assert {k: e["state"] for k, e in a.items()} == {k: e["state"] for k, e in b.items()}
    for name, e in b.items():
        if e["state"] != "done":
            assert e["error"] == a[name]["error"]
            continue
        assert verified(name, e, merged)  # every file there, hashes as recorded
        owner = next(tmp_path / f"s{i}" for i in range(n) if name in shard_names[i])
        assert e["files"] == _manifest(owner)[name]["files"]
        assert e["files"]["model.onnx"] == a[name]["files"]["model.onnx"], name  # the same bytes as unsharded
        # safetensors stores its metadata map in no fixed order, so compare the tensors
        x, y = load_file(str(merged / name / "model.safetensors")), load_file(str(tmp_path / "whole" / name / "model.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    summary = json.loads((merged / "summary.json").read_text())
    assert list(summary["entries"]) == list(a) and sorted(summary["ran"]) == sorted(a)
    _no_partial_files(merged)

    again = run_cli("batch", "--merge", tmp_path / "s0", tmp_path / "s0", "-o", tmp_path / "twice")
    assert again.returncode == 2 and "overlap" in again.stderr and not (tmp_path / "twice").exists()


def test_sigterm_stops_the_batch_and_its_running_entry_cleanly(tmp_path, image_zip):
    zoo, out = _zoo(tmp_path, n_good=2, broken=False), tmp_path / "out"
    write_recipe(tmp_path / "r.yaml", RECIPE + f"distill: {{data: {image_zip}, steps: 100000, batch_size: 8, device: cpu}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "compress", "batch", str(zoo), "-o", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(out.glob(".m0.tmp-*")):  # the first entry's run has staged
        time.sleep(0.2)
    time.sleep(2)  # into its rewrite or distillation
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143 and "error: terminated; nothing was published" in err, err
    states = {n: e["state"] for n, e in _manifest(out).items()}
    assert states == {"m0": "failed", "m1": "pending"}, states  # the running entry was told to stop, and said so
    assert _manifest(out)["m0"]["exit_code"] == 143
    assert not (out / "m0").exists() and not list(out.glob(".m0.tmp-*"))  # nothing published, no staging left
