"""`compress` command lines in child processes forked from one that has imported compress already.

`compress batch` runs each entry this way, as the tests run the CLI: a child still has its own pid, exit code,
stdout and stderr (written to files), and a crash or out-of-memory there takes nothing else down, but it does not
pay the ~4-8 s of imports (torch, timm, torchvision, onnx) a fresh `python -m compress` costs. The fork server is a
multiprocessing forkserver that imports `compress._preload` once; it exits when the process that started it ends,
and a child started with `die_with_parent` is killed then too. Where no forkserver exists (not POSIX),
`available()` is False and callers start `python -m compress` instead.
"""
from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import multiprocessing.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

MAIN = str(Path(__file__).parents[1] / "__main__.py")


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


def _child(entry, args: list, cwd: str, env: dict, out: str, err: str, die_with_parent: bool) -> None:
    """Become `python -m compress ARGS` run in cwd with env, stdout/stderr into the files out/err: entry() is the
    CLI's main (passed in by the caller, so this module needs no import of the CLI that drives it)."""
    if die_with_parent:  # the fork server ends with the process that started it: so does this run
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
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
        entry()
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
    """Start the fork server (it imports in the background) with the environment as it is now. Its socket is in
    Linux's abstract namespace where there is one: no file, so a SIGKILLed caller leaves nothing in TMPDIR."""
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["compress._preload"])
            named = multiprocessing.connection.arbitrary_address
            if multiprocessing.util.abstract_sockets_supported:
                multiprocessing.connection.arbitrary_address = \
                    lambda family: f"\0compress-forkrun-{os.getpid()}-{os.urandom(6).hex()}" if family == "AF_UNIX" else named(family)
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                multiprocessing.connection.arbitrary_address = named
            _ctx = ctx


def spawn(entry, args: list, cwd: Path, env: dict | None, out: Path, err: Path, die_with_parent: bool = False):
    """Start the CLI (entry: its main) with args in a forked child writing to the files out/err; returns the multiprocessing
    Process (.pid, .kill() = SIGKILL, .join(), .exitcode: negative for a signal, as subprocess's returncode)."""
    start()
    out.touch()
    err.touch()
    proc = _ctx.Process(target=_child, args=(entry, [str(a) for a in args], str(cwd), dict(os.environ if env is None else env),
                                             str(out), str(err), die_with_parent))
    proc.start()
    return proc


def run(entry, args: list, cwd: Path, env: dict | None = None, timeout: float | None = 600,
        die_with_parent: bool = False, started=None, scratch: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI (entry: its main) with args in a forked child; stdout/stderr as text, like subprocess.run(capture_output=True).
    started(proc): called with the running Process (the batch keeps it, to pass a stop on). scratch: where the
    child's output files go while it runs (default: multiprocessing's temp folder)."""
    args = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="forkrun-", dir=scratch or multiprocessing.util.get_temp_dir()) as tmp:
        out, err = Path(tmp) / "out", Path(tmp) / "err"
        proc = spawn(entry, args, cwd, env, out, err, die_with_parent)
        if started is not None:
            started(proc)
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["compress", *args], timeout)
        return subprocess.CompletedProcess(["compress", *args], proc.exitcode, out.read_text(), err.read_text())
