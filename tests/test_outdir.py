"""The output directory as ops pipelines meet it: two runs to one OUT, a folder made while a run works, a
container's rerun after a kill, --overwrite on a user's folder, a full disk, stdout to a full device."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.core.errors import InputError
from compress.core.locks import scratch_dir
from compress.run.outdir import claim, let_go
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.run.verify import verify
from tests.conftest import REPO, run_cli, write_recipe

RECIPE = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: null}\n"
ROOT = os.geteuid() == 0


def _cli(*args):
    return [sys.executable, "-m", "compress", *map(str, args)]


def _env(tmpdir: Path) -> dict:
    tmpdir.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmpdir)}


def _wait_for(pattern_dir: Path, pattern: str, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = list(pattern_dir.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"{pattern} never appeared in {pattern_dir} (exit {proc.poll()})")


def leftovers(tmpdir: Path) -> list:
    """What runs left in their TMPDIR, less onnxruntime's `.ses` (its telemetry session id, written on import and
    reused by every later import: not a temporary file of a run)."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")


def _one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_two_runs_to_one_out_one_publishes_the_other_exits_2(tmp_path, vit_dir):
    recipe, res = write_recipe(tmp_path / "r.yaml", RECIPE), tmp_path / "res"
    env = _env(tmp_path / "tmp")
    procs = [subprocess.Popen(_cli("apply", recipe, vit_dir, "-o", res / "x"), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(c for c, _, _ in done)
    assert codes == [0, 2], done
    err = next(e for c, _, e in done if c == 2)
    line = _one_error_line(err)
    assert str(res / "x") in line and ("another compress run" in line or "already exists" in line), line
    assert verify(res / "x", 2)["hashes"] > 0
    assert sorted(p.name for p in res.iterdir()) == ["x"]  # no staging, backup or lock left by either
    assert leftovers(tmp_path / "tmp") == []


def test_a_folder_made_at_out_during_the_run_is_kept_and_so_is_the_result(tmp_path, vit_dir):
    """The issue's case: `mkdir out/x; echo precious > out/x/IMPORTANT.txt` while a run to -o out/x works."""
    recipe, res = write_recipe(tmp_path / "r.yaml", RECIPE), tmp_path / "res"
    proc = subprocess.Popen(_cli("apply", recipe, vit_dir, "-o", res / "x", "--overwrite"), cwd=REPO,
                            env=_env(tmp_path / "tmp"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(res, ".x.tmp-*", proc)  # the run has claimed x and staged; x itself does not exist yet
    (res / "x").mkdir()
    (res / "x" / "IMPORTANT.txt").write_text("precious")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    line = _one_error_line(err)
    kept = [p for p in res.iterdir() if p.name.startswith("x.unpublished-")]
    assert len(kept) == 1 and str(kept[0]) in line, line
    assert (res / "x" / "IMPORTANT.txt").read_text() == "precious" and os.listdir(res / "x") == ["IMPORTANT.txt"]
    assert verify(kept[0], 2)["hashes"] > 0  # the result, whole, where the line says
    assert sorted(p.name for p in res.iterdir()) == ["x", kept[0].name]


def test_overwrite_refuses_a_users_folder_unless_forced(tmp_path, vit_dir):
    recipe, out = write_recipe(tmp_path / "r.yaml", RECIPE), tmp_path / "mine"
    out.mkdir()
    (out / "IMPORTANT.txt").write_text("precious")
    r = run_cli("apply", recipe, vit_dir, "-o", out, "--overwrite", cwd=tmp_path)
    assert r.returncode == 2 and "--overwrite=force" in _one_error_line(r.stderr)
    assert os.listdir(out) == ["IMPORTANT.txt"] and sorted(os.listdir(tmp_path)) == ["mine", "r.yaml", "vit"]
    r = run_cli("apply", recipe, vit_dir, "-o", out, "--overwrite=force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (out / "IMPORTANT.txt").exists() and (out / "report.json").is_file()
    r = run_cli("apply", recipe, vit_dir, "-o", out, "--overwrite", cwd=tmp_path)  # now a compress result
    assert r.returncode == 0, r.stderr


def test_staging_is_stale_when_its_lock_is_free_not_by_pid(tmp_path):
    """A killed run's `.x.tmp-1` (PID 1 lives: it is init, or this container's rerun) is removed once the lock is
    free; while another process holds the lock, a second claim stops with exit 2 and touches nothing."""
    out = tmp_path / "x"
    (tmp_path / ".x.tmp-1").mkdir()
    (tmp_path / ".x.tmp-1" / "model.onnx").write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'w'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(tmp_path / ".x.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match="being written by another compress run"):
            claim(out)
        assert (tmp_path / ".x.tmp-1").is_dir()
    finally:
        holder.kill()
        holder.wait()
    c = claim(out)
    try:
        assert not (tmp_path / ".x.tmp-1").exists() and c.staging.is_dir()
    finally:
        let_go(c)
    assert os.listdir(tmp_path) == []


def test_scratch_dirs_of_killed_runs_are_swept_live_ones_kept(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    dead, live = tmp_path / "compress-teacher-dead", tmp_path / "compress-teacher-live"
    for d in (dead, live):
        d.mkdir()
        (d / "teacher.onnx").write_bytes(b"x" * 100)
        (d / ".lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1]); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(live / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with scratch_dir("compress-teacher-") as mine:
            assert mine.is_dir() and not dead.exists() and live.is_dir()
        assert not mine.exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not ROOT or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a fresh PID namespace (as a container's rerun gets)")
def test_container_rerun_after_sigkill_during_export(tmp_path, vit_dir):
    """`unshare -fp --mount-proc`: the run is PID 1 both times, so a PID in a staging name could never tell."""
    recipe, res, tmpdir = write_recipe(tmp_path / "r.yaml", RECIPE), tmp_path / "res", tmp_path / "tmp"
    line = ["unshare", "-fp", "--mount-proc", *_cli("apply", recipe, vit_dir, "-o", res / "x")]
    proc = subprocess.Popen(line, cwd=REPO, env=_env(tmpdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    staging = _wait_for(res, ".x.tmp-*", proc)
    _wait_for(staging, "model.*", proc)  # exporting
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (res / "x").exists() and list(res.glob(".x.tmp-*"))  # what a kill leaves: staging, no result
    again = subprocess.run(line, cwd=REPO, env=_env(tmpdir), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert verify(res / "x", 2)["hashes"] > 0
    assert sorted(p.name for p in res.iterdir()) == ["x"] and leftovers(tmpdir) == []


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root (the fault-injected test below runs anyway)")
@pytest.mark.parametrize("where", ["out", "tmpdir"])
def test_full_disk_is_exit_2_one_line_nothing_left(tmp_path, vit_dir, where):
    """-o on a full file system, or TMPDIR (the teacher's temporary ONNX) on one."""
    recipe, small = write_recipe(tmp_path / "r.yaml", RECIPE), tmp_path / "small"
    _tmpfs(small, "48k")
    try:
        out = small / "x" if where == "out" else tmp_path / "x"
        tmpdir = tmp_path / "tmp" if where == "out" else small
        r = run_cli("apply", recipe, vit_dir, "-o", out, cwd=tmp_path, env=_env(tmpdir))
        assert r.returncode == 2, r.stderr
        line = _one_error_line(r.stderr)
        assert "no space left on device while writing" in line and "MB needed" in line, line
        assert ("-o on a file system with room" if where == "out" else "TMPDIR") in line, line
        assert leftovers(small) == [] and not out.exists()  # no result, staging, lock or temporary file
        assert sorted(os.listdir(tmp_path)) == sorted(["r.yaml", "small", "vit", *(["tmp"] if where == "out" else [])])
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_write_that_fails_for_space_is_exit_2_and_leaves_nothing(tmp_path, vit_dir, monkeypatch):
    """The same without root: safetensors' own error (its text carries the OS's words), injected."""
    from safetensors import SafetensorError

    def full(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")

    monkeypatch.setattr("compress.export.write.save_model", full)
    rec = parse_recipe({"version": 1, "passes": [{"mlp_strip": {"blocks": [0]}}], "report": {"latency": None}})
    with pytest.raises(InputError, match=r"^no space left on device while writing model.safetensors .*MB needed"):
        apply(rec, str(vit_dir), tmp_path / "out", log=lambda m: None)
    assert sorted(os.listdir(tmp_path)) == ["vit"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_stdout_to_a_full_device_is_exit_2(vit_dir):
    with open("/dev/full", "w") as full:
        r = subprocess.run(_cli("inspect", vit_dir), cwd=REPO, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "cannot write to standard output (no space left on device)" in _one_error_line(r.stderr)


def test_a_second_batch_to_the_same_out_exits_2_and_touches_nothing(tmp_path):
    """The batch holds OUT's lock for its whole run (its entries each hold their own folder's)."""
    write_recipe(tmp_path / "r.yaml", RECIPE)
    zoo = write_recipe(tmp_path / "zoo.yaml", "version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: m0}\n")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from compress.run.outdir import claim; "
                               "c = claim(__import__('pathlib').Path(sys.argv[1]), staged=False); print('held', flush=True); "
                               "time.sleep(60)", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run_cli("batch", zoo, "-o", out, cwd=tmp_path)
        assert r.returncode == 2 and "being written by another compress run (pid" in _one_error_line(r.stderr), r.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
