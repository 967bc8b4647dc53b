"""The CLI in a real child process without paying its imports each time (torch, timm, onnx: ~4 s of CPU a run).

A multiprocessing fork server imports this module (and so compress and its libraries) once; each run is a
fresh fork of it that takes the caller's cwd and environment, writes to its own fd 1/2 and exits with the
CLI's exit code, as `python -m compress ...` would. Kill/SIGTERM tests still start `python -m compress`.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.util
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import onnx  # noqa: F401 - preloaded in the fork server
import onnxruntime  # noqa: F401
import timm  # noqa: F401
import torch  # noqa: F401

import compress.analysis  # noqa: F401 - what the commands import lazily
import compress.batch  # noqa: F401
import compress.batch_merge  # noqa: F401
import compress.inspect  # noqa: F401
import compress.pipeline  # noqa: F401
import compress.plan  # noqa: F401
import compress.verify  # noqa: F401
from compress.cli import main

MAIN = str(Path(compress.cli.__file__).with_name("__main__.py"))


def _child(args: list, cwd: str, env: dict, out: str, err: str) -> None:
    """Become `python -m compress ARGS` run in cwd with env, stdout/stderr into the files out/err."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR is the caller's, not the fork server's
    multiprocessing.set_start_method(None, force=True)  # the platform's default again (DataLoader workers), not ours
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = [MAIN, *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    finally:
        atexit._run_exitfuncs()  # what the interpreter does at exit (multiprocessing's own exit skips it)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


_ctx = None
_lock = threading.Lock()


def start() -> None:
    """Start the fork server (it imports in the background) with the environment as it is now."""
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            multiprocessing.forkserver.ensure_running()
            _ctx = ctx


def spawn(args: list, cwd: Path, env: dict | None, out: Path, err: Path):
    """Start the CLI with args in a forked child writing to the files out/err; returns the multiprocessing
    Process (.pid, .kill() = SIGKILL, .join(), .exitcode), for tests that kill a run at a chosen moment."""
    start()
    out.touch()
    err.touch()
    proc = _ctx.Process(target=_child, args=([str(a) for a in args], str(cwd), dict(os.environ if env is None else env),
                                             str(out), str(err)))
    proc.start()
    return proc


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the CLI with args in a forked child; stdout/stderr as text, like subprocess.run(capture_output=True)."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="forkcli-", dir=multiprocessing.util.get_temp_dir()) as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        proc = spawn(args, cwd, env, out, err)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["compress", *args], timeout)
        return subprocess.CompletedProcess(["compress", *args], proc.exitcode, out.read_text(), err.read_text())
