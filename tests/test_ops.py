"""Ops-grade behaviour (issue 37): what schedulers and containers do to a run -- kills, lost statuses, requeues."""
from __future__ import annotations

import json
import multiprocessing.forkserver
import os
import random
import signal
import subprocess
import sys
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


def test_hundreds_of_forked_runs_with_kills_never_get_a_wrong_status(tmp_path):
    """Item 2's stress: short forked runs, 4 at a time (2 shared cores: loaded), every 4th killed at a random moment;
    each status is the command's own (0 for schema, 2 for a missing checkpoint) or the kill's, never another number."""
    forkcli.start()
    rng = random.Random(37)
    plan = [(i, ["schema"] if i % 2 else ["inspect", str(tmp_path / "missing")], i % 4 == 3 and rng.uniform(0, 0.4))
            for i in range(150)]

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
