"""Ops-grade behaviour (issue 37): what schedulers and containers do to a run -- kills, lost statuses, requeues."""
from __future__ import annotations

import json
import multiprocessing.connection
import multiprocessing.forkserver
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from compress.run import forkrun
from tests import forkcli
from tests.conftest import REPO, run_cli, save_timm_dir, tiny_vit, tiny_vit_args, write_recipe


def _sleep_then_exit_3():
    """A forked entry that outlives a killed forkserver, then exits 3."""
    time.sleep(1.5)
    sys.exit(3)


def test_a_status_the_forkserver_loses_is_the_childs_own(tmp_path):
    """Item 2: multiprocessing reports 255 when the forkserver loses a child's status; the child's own pipe tells."""
    forkcli.start()

    def kill_forkserver(proc):  # it loses every status it held
        time.sleep(0.3)
        os.kill(multiprocessing.forkserver._forkserver._forkserver_pid, signal.SIGKILL)

    assert forkrun.run(_sleep_then_exit_3, [], tmp_path, timeout=30, started=kill_forkserver).returncode == 3


def _sleep_long():
    time.sleep(60)


def test_a_start_in_another_thread_does_not_steal_a_killed_runs_status(tmp_path, monkeypatch):
    """CI's StatusLost: Process.start() polls every live child; a start in another thread that had read a killed run's
    status (slowed here between the read and its record) left this thread's read an EOF, recorded as 255."""
    forkcli.start()
    proc = forkrun.spawn(_sleep_long, [], tmp_path, None, tmp_path / "a.out", tmp_path / "a.err")
    proc.kill()
    multiprocessing.connection.wait([proc.sentinel], 30)
    read = multiprocessing.forkserver.read_signed
    reading = threading.Event()

    def slow_read(fd):
        value = read(fd)
        if threading.current_thread().name == "starter":
            reading.set()
            time.sleep(0.5)
        return value

    monkeypatch.setattr(multiprocessing.forkserver, "read_signed", slow_read)
    other = []
    starter = threading.Thread(name="starter", target=lambda: other.append(
        forkrun.spawn(_sleep_long, [], tmp_path, None, tmp_path / "b.out", tmp_path / "b.err")))
    starter.start()
    assert reading.wait(30)  # the starter is between its read of the killed run's status and its record
    try:
        assert forkrun.wait(proc, 30) == -signal.SIGKILL
    finally:
        starter.join(30)
        for p in other:
            p.kill()
            forkrun.wait(p, 30)


def test_hundreds_of_forked_runs_with_kills_never_get_a_wrong_status(tmp_path):
    """Item 2's stress: short forked runs, 4 at a time (2 shared cores: loaded), every 4th killed at a random moment;
    each status is the command's own (0 for schema, 2 for a missing checkpoint) or the kill's, never another number."""
    forkcli.start()
    rng = random.Random(37)
    plan = [(i, ["schema"] if i % 2 else ["inspect", str(tmp_path / "missing")], i % 4 == 3 and rng.uniform(0, 0.4))
            for i in range(250)]

    def one(item):
        i, args, kill_after = item
        out, err = tmp_path / f"{i}.out", tmp_path / f"{i}.err"
        proc = forkcli.spawn(args, REPO, None, out, err)
        if kill_after is not False:
            time.sleep(kill_after)
            proc.kill()
        code = forkrun.wait(proc, 120)
        return i, args, kill_after, code, out.read_text(), err.read_text()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, plan))
    wrong = []
    for i, args, killed, code, out, err in results:
        expect = 0 if args == ["schema"] else 2
        ok = code == expect or (killed is not False and code == -signal.SIGKILL)
        if ok and code == 0:
            ok = json.loads(out)["title"] is not None
        if ok and code == 2:
            ok = err.strip().startswith("error: checkpoint not found")
        if not ok:
            wrong.append((i, args, killed, code, err[-200:]))
    assert wrong == []
    assert sum(1 for r in results if r[3] == -signal.SIGKILL) > 0  # some kills landed mid-run


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] not in "ZX"
    except (OSError, IndexError):
        return False


SLOW = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: {batch_sizes: [1, 2], threads: 1, warmup: 1, runs: 100}}\n"


def test_sigkill_of_batch_kills_its_running_entry_and_resume_finishes_it(tmp_path):
    """Item 1: a SIGKILLed batch's entry dies at once (its own death pipe, not the forkserver's lifetime); the
    immediate --resume (a scheduler's retry) then converts that entry instead of finding it locked."""
    for i in range(2):
        save_timm_dir(tiny_vit(seed=i, heads=2), "vit_tiny_patch16_224", tiny_vit_args(heads=2), tmp_path / f"m{i}")
    write_recipe(tmp_path / "r.yaml", SLOW)
    zoo = write_recipe(tmp_path / "zoo.yaml", "version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: m0}\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "compress", "batch", str(zoo), "-o", str(out)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lock, pid = out / ".m0.lock", None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and pid is None:  # the entry writes its pid into its lock
        text = lock.read_text() if lock.exists() else ""
        pid = int(text.split()[1]) if text.startswith("pid ") else None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and pid is not None, "the batch finished before it could be killed"
    t0 = time.time()
    while time.time() - t0 < 5 and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid), "the entry outlived its batch"
    write_recipe(tmp_path / "r.yaml", SLOW.split("report:")[0] + "report: {latency: null}\n")  # a quick retry
    res = run_cli("batch", zoo, "-o", out, "--resume")
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())["entries"]
    assert m["m0"]["state"] == "done" and (out / "m0" / "model.onnx").is_file()


def _env(**kw) -> dict:
    return {**os.environ, **{k: str(v) for k, v in kw.items()}}


def _one_error_line(res, *words):
    line = res.stderr.strip()
    assert res.returncode == 2 and "\n" not in line and line.startswith("error: "), (res.returncode, res.stderr[-2000:])
    assert all(w in line for w in words), line
    return line


UNTIMED = "version: 1\nreport: {latency: null}\n"


def test_a_runtime_cache_whose_python_is_gone_is_refused_first_and_repaired_by_prepare(tmp_path, vit_dir):
    """Item 3: `.ready` beside a dangling bin/python (a pyenv upgrade, an image copy) is not a ready runtime."""
    home = tmp_path / "cache" / "ort-1.16.3"
    (home / "bin").mkdir(parents=True)
    (home / ".ready").write_text("1.16.3\n")
    (home / "bin" / "python").symlink_to(tmp_path / "pyenv" / "3.11.6" / "bin" / "python3.11")
    env = _env(COMPRESS_CACHE=tmp_path / "cache", PIP_NO_INDEX=1, PIP_FIND_LINKS="", PIP_INDEX_URL="")
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out", env=env)
    _one_error_line(res, "is broken", "compress runtime prepare 1.16")
    assert "load" not in res.stdout and not (tmp_path / "out").exists()  # before any work
    res = run_cli("runtime", "prepare", "1.16", env=env)  # offline: it tries to rebuild, and says it could not
    assert "ready" not in res.stdout and "broken" in res.stdout
    _one_error_line(res, "could not be installed")


def test_o_dot_and_long_names_are_decided_before_any_work(tmp_path, vit_dir):
    """Items 5 and 10: `-o .` (plain and --overwrite=force) and an OUT name too long for the names compress puts
    beside it are one line, exit 2, before the model is even loaded."""
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    here = tmp_path / "here"
    here.mkdir()
    for extra in ([], ["--overwrite=force"]):
        res = run_cli("apply", recipe, vit_dir, "-o", ".", *extra, cwd=here)
        _one_error_line(res, "output . is the current directory", "-o result")
        assert "load" not in res.stdout and sorted(os.listdir(here)) == []
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / ("x" * 240))
    _one_error_line(res, "output name xxxx", "240 bytes", "at most 234 bytes")
    assert "load" not in res.stdout


def test_out_a_symlink_to_a_directory_is_followed(tmp_path, vit_dir):
    """Item 10: the `current -> v3` layout: v3 receives the result, the link stays."""
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    (tmp_path / "v3").mkdir()
    (tmp_path / "current").symlink_to("v3")
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "current")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "current").is_symlink() and (tmp_path / "v3" / "model.onnx").is_file()


def _zoo(tmp_path):
    write_recipe(tmp_path / "r.yaml", UNTIMED)
    return write_recipe(tmp_path / "zoo.yaml", "version: 1\nrecipe: r.yaml\nentries:\n  - {checkpoint: nope}\n")


@pytest.mark.parametrize("manifest", [None, "[]", "null", '{"entries": []}', '{"version": 1, "entries": {"a": 3}}'])
def test_resume_only_into_a_batch_output(tmp_path, manifest):
    """Item 6: --resume into a folder that is no batch output leaves it alone; a malformed manifest is one line."""
    zoo, out = _zoo(tmp_path), tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("the user's own notes\n")
    if manifest is not None:
        (out / "manifest.json").write_text(manifest)
    res = run_cli("batch", zoo, "-o", out, "--resume")
    _one_error_line(res, "--resume:", str(out))
    assert (out / "summary.md").read_text() == "the user's own notes\n"


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc'", "whole number"]),
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "RANK", "torchrun"]),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, ["RANK='2'", "0..1"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, ["MASTER_PORT='http'"]),
    ({"COMPRESS_RENDEZVOUS_TIMEOUT_S": "soon"}, ["soon"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["LOCAL_RANK"]),
    ({"COMPRESS_PROGRESS_S": "fast"}, ["COMPRESS_PROGRESS_S='fast'"]),
])
def test_environment_variables_are_checked_at_the_edge(tmp_path, vit_dir, env, words):
    """Item 7: what PyTorchJob/Slurm containers set, wrong, is one line (it was exit 1 with a traceback)."""
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out", env=_env(**env))
    _one_error_line(res, *words)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rendezvous_without_peers_times_out_and_sigterm_stops_it(tmp_path, vit_dir):
    """Item 7: rank 0 of 2 with no peer used to wait in init_process_group for ever, deaf to SIGTERM."""
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    world = {"WORLD_SIZE": 2, "RANK": 0, "LOCAL_RANK": 0, "MASTER_ADDR": "127.0.0.1"}
    t0 = time.time()
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out",
                  env=_env(**world, MASTER_PORT=_free_port(), COMPRESS_RENDEZVOUS_TIMEOUT_S=2))
    assert res.stderr.startswith("rendezvous: rank 0 of 2 waiting for the others at 127.0.0.1:")
    res.stderr = res.stderr.split("\n", 1)[1]
    _one_error_line(res, "no rendezvous", "within 2 s", "COMPRESS_RENDEZVOUS_TIMEOUT_S")
    assert time.time() - t0 < 60
    out, err = tmp_path / "o", tmp_path / "e"
    proc = forkcli.spawn(["apply", recipe, vit_dir, "-o", tmp_path / "out"], REPO, _env(**world, MASTER_PORT=_free_port()),
                         out, err)
    deadline = time.time() + 60
    while time.time() < deadline and "waiting for the others" not in err.read_text() and forkrun.wait(proc, 0.2) is None:
        pass
    time.sleep(0.5)  # inside init_process_group now (default limit 300 s): stop it as a scheduler does
    os.kill(proc.pid, signal.SIGTERM)
    code = forkrun.wait(proc, 20)
    assert code == 143, (code, err.read_text())
    assert err.read_text().strip().splitlines()[-1] == "error: terminated; nothing was published"


@pytest.mark.parametrize("args, words", [
    (["verify", "nowhere", "--images", "0"], ["--images", "greater than or equal to 1", "compress verify --help"]),
    (["verify", "nowhere", "--images", "-3"], ["--images"]),
    (["batch", "zoo.yaml", "--jobs", "0"], ["--jobs"]),
    (["apply"], ["Missing argument", "compress apply --help"]),
    (["apply", "r.yaml", "ckpt", "--nope"], ["No such option: --nope"]),
])
def test_usage_errors_are_one_line(args, words):
    """Items 8 and 11: arguments are checked by their types; a usage error is one `error:` line, not a box."""
    _one_error_line(run_cli(*args), *words)


@pytest.mark.parametrize("args", [["schema"], ["--help"], ["inspect", "--help"]])
def test_a_full_stdout_is_one_line_exit_2(args):
    """Item 8: `> /dev/full` was exit 1 with a traceback."""
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "compress", *args], cwd=REPO, stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    _one_error_line(res, "cannot write to standard output", "no space left")


@pytest.mark.parametrize("args", [["--help"], ["apply", "--help"]])
def test_a_closed_stdout_pipe_is_one_line_exit_2(args):
    """Item 8: help into a pipe whose reader has gone (`| head -c 1`) was exit 1 in silence (rich and typer each
    end a broken pipe with exit 1)."""
    read, write = os.pipe()
    os.close(read)
    try:
        res = subprocess.run([sys.executable, "-m", "compress", *args], cwd=REPO, stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write)
    _one_error_line(res, "cannot write to standard output", "broken pipe")


SIGNAL_AFTER_PUBLISH = """
import os, signal, sys
import compress.run.pipeline as p
real = p.publish
def publish(held):
    real(held)
    os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop (and a Ctrl-C) just after the rename
    os.kill(os.getpid(), signal.SIGINT)
p.publish = publish
from compress.cli import main
sys.argv = ["compress", *sys.argv[1:]]
main()
"""


def test_a_signal_after_publish_still_exits_0(tmp_path, vit_dir):
    """Item 9: OUT is complete once renamed; a signal then used to make the exit 130/143 (a failure to a scheduler)."""
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    res = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_PUBLISH, "apply", str(recipe), str(vit_dir), "-o",
                          str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "out" / "report.json").is_file() and f"wrote {tmp_path / 'out'}/" in res.stdout


def test_paths_that_are_no_regular_file_are_named_for_what_they_are(tmp_path, vit_dir):
    """Item 10: a folder, a pipe, a symlink loop and a foreign zip were "not found" or "pickled code"."""
    (tmp_path / "rdir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to("loop")
    import zipfile

    with zipfile.ZipFile(tmp_path / "random.pt", "w") as z:
        z.writestr("blob.bin", os.urandom(4096))
    recipe = write_recipe(tmp_path / "r.yaml", UNTIMED)
    _one_error_line(run_cli("apply", tmp_path / "rdir", vit_dir), "recipe", "is a directory")
    _one_error_line(run_cli("apply", tmp_path / "fifo", vit_dir), "recipe", "is a pipe")
    _one_error_line(run_cli("apply", tmp_path / "loop", vit_dir), "recipe", "symlink loop")
    _one_error_line(run_cli("inspect", tmp_path / "fifo"), "checkpoint", "is a pipe")
    _one_error_line(run_cli("inspect", tmp_path / "loop"), "checkpoint", "symlink loop")
    line = _one_error_line(run_cli("inspect", tmp_path / "random.pt"), "not a PyTorch checkpoint", "without data.pkl")
    assert "pickled" not in line and "run code" not in line
    assert recipe.is_file()


def test_a_yaml_alias_bomb_is_one_short_line(tmp_path, vit_dir):
    """Item 11: 1 KB of nested aliases in model.kwargs expanded to a 157 MB error line and 1.27 GB RSS."""
    levels = ["    l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    recipe = write_recipe(tmp_path / "bomb.yaml", "version: 1\nmodel:\n  arch: timm:vit_tiny_patch16_224\n  kwargs:\n"
                          + "\n".join(levels) + "\n")
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    _one_error_line(res, "aliases", "100,000 values")
    assert len(res.stderr) < 1000


def test_16_bit_grayscale_is_scaled_and_a_short_folder_warned(tmp_path):
    """Item 11: PIL's convert() clipped a 16-bit PNG to white; 16 calibration images from a 1-image folder ran
    without a word."""
    import numpy as np
    from PIL import Image

    from compress.load.data import ImageFolderData, calibration_batch

    (tmp_path / "d" / "c").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "d" / "c" / "a.png")
    ds = ImageFolderData(tmp_path / "d", lambda img: np.asarray(img))
    pixels, _ = ds[0]
    assert pixels.shape == (8, 8, 3) and (pixels == 128).all()
    said = []
    cfg = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    x, _ = calibration_batch(tmp_path / "d", cfg, 16, 0, log=said.append)
    assert len(x) == 1 and said and said[-1].startswith("warning: 16 calibration images asked") and "holds only 1" in said[-1]
