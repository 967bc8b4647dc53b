"""Item 4 of issue 37: a run never reaches the network, and onnxruntime's telemetry leaves no files behind."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO, write_recipe


def test_apply_makes_no_network_attempt_and_no_telemetry_files(tmp_path, vit_dir):
    """A real `compress apply` in a fresh interpreter, HOME and TMPDIR empty folders: onnxruntime >= 1.2x wrote
    `$TMPDIR/.ses` and a device id under `~/.cache/Microsoft` (and may look up its events host). Under strace
    (where installed) no connect/sendto to an internet address either."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), tmp.mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n"
                          "export: {min_runtime: null}\nreport: {latency: {batch_sizes: [1], threads: 1, warmup: 1, runs: 2}}\n")
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp)}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # compress itself must switch it off
    cmd = [sys.executable, "-m", "compress", "apply", str(recipe), str(vit_dir), "-o", str(tmp_path / "out")]
    trace = tmp_path / "net.trace"
    strace = shutil.which("strace")
    if strace:
        probe = subprocess.run([strace, "-f", "-qq", "-e", "trace=connect", "-o", os.devnull, "true"], capture_output=True)
        if probe.returncode == 0:
            cmd = [strace, "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-o", str(trace), *cmd]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    left = sorted(str(p.relative_to(tmp_path)) for p in [*home.rglob("*"), *tmp.rglob("*")]
                  if ".ses" in p.name or "Microsoft" in p.parts or "deviceid" in p.name)
    assert left == []
    if trace.exists():
        net = [line for line in trace.read_text().splitlines() if "AF_INET" in line or "sin_port" in line]
        assert net == []
