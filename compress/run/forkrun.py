"""`compress` command lines in child processes forked from one that has imported compress already.

`compress batch` runs each entry this way, as the tests run the CLI: a child still has its own pid, exit code,
stdout and stderr (written to files), and a crash or out-of-memory there takes nothing else down, but it does not
pay the ~4-8 s of imports (torch, timm, torchvision, onnx) a fresh `python -m compress` costs. The fork server is a
multiprocessing forkserver that imports `compress._preload` once; it exits when the process that started it ends.

The forkserver is the children's parent, not the caller, so neither its lifetime nor its bookkeeping is trusted:
- a child started with `die_with_parent` watches the read end of its own pipe, whose write end only the caller
  holds; EOF (the caller died, SIGKILL included) makes the child kill its process group at once;
- each child writes its exit status on its own pipe before it exits. The forkserver reports 255 when it loses a
  child's status; a status neither the child nor a signal gave is `StatusLost`, never a number.
Where no forkserver exists (not POSIX), `available()` is False and callers start `python -m compress` instead.
"""
from __future__ import annotations

import atexit
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
import time
from pathlib import Path

MAIN = str(Path(__file__).parents[1] / "__main__.py")


def available() -> bool:
    return "forkserver" in multiprocessing.get_all_start_methods()


class StatusLost(RuntimeError):
    """A forked run ended and neither it nor a signal left an exit status (the forkserver lost it)."""


def _watch(death) -> None:
    """In the child: block on the death pipe; EOF means the caller is gone, so this run and its group end now."""
    try:
        death.recv_bytes()
    except (EOFError, OSError):
        pass
    os.killpg(0, signal.SIGKILL)


def _child(entry, args: list, cwd: str, env: dict, out: str, err: str, death, status) -> None:
    """Become `python -m compress ARGS` run in cwd with env, stdout/stderr into the files out/err: entry() is the
    CLI's main (passed in by the caller, so this module needs no import of the CLI that drives it). `death`: the
    read end of the caller's pipe (None: live on); `status`: where the exit code goes before exit."""
    if death is not None:  # its own process group (the latency child, ort runners), killed whole with the caller
        os.setpgid(0, 0)
        threading.Thread(target=_watch, args=(death,), daemon=True).start()
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
    try:
        status.send_bytes(code.to_bytes(4, "little", signed=True))
    finally:
        os._exit(code)


_ctx = None
_lock = threading.Lock()
_polls = threading.Lock()  # multiprocessing's Process.start() polls every live child (its _cleanup) from the caller's
# thread: two polls of one child at once read its status twice, the second gets EOF and records 255 (CI saw
# StatusLost for a killed run). Every start and every poll here holds this lock.


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
    Process (.pid, .kill() = SIGKILL, .exitcode: negative for a signal) with `.returncode()` (see `wait`).
    die_with_parent: the child ends (with its process group) the moment this process ends, however it ends."""
    start()
    out.touch()
    err.touch()
    death_r, death_w = _ctx.Pipe(duplex=False) if die_with_parent else (None, None)
    status_r, status_w = _ctx.Pipe(duplex=False)
    proc = _ctx.Process(target=_child, args=(entry, [str(a) for a in args], str(cwd), dict(os.environ if env is None else env),
                                             str(out), str(err), death_r, status_w))
    try:
        with _polls:
            proc.start()
    finally:
        for end in (death_r, status_w):  # the child's ends: only the child holds them now
            if end is not None:
                end.close()
    proc._death, proc._status = death_w, status_r  # kept open as long as the Process object lives
    return proc


def _exitcode(proc, timeout: float | None = 0.0) -> int | None:
    """proc.exitcode once its sentinel is ready within timeout (None: still running). The wait is unlocked; only the
    read of the status, which is quick once the sentinel is ready, holds `_polls`."""
    if not multiprocessing.connection.wait([proc.sentinel], timeout):
        return None
    with _polls:
        return proc.exitcode


def wait(proc, timeout: float | None = None) -> int | None:
    """The child's exit code (negative: the signal that killed it), or None while it runs after `timeout`.
    The code the child sent on its own pipe wins; without one, only a signal is believed: a plain number from the
    forkserver then is one it made up (255 when it lost the status), raised as StatusLost."""
    deadline = None if timeout is None else time.monotonic() + timeout
    left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
    st = proc._status
    ready = multiprocessing.connection.wait([st, proc.sentinel], left())
    if not ready:
        return None
    if st not in ready:  # the forkserver says it ended: its code holds only if the child wrote nothing
        code = _exitcode(proc)
        if code is not None and code < 0 and not st.poll(0):
            return code
        if not multiprocessing.connection.wait([st], left()):
            return None  # the forkserver died or lost it, the child may still run: wait on its own pipe
    try:
        return int.from_bytes(st.recv_bytes(), "little", signed=True)
    except (EOFError, OSError):
        pass
    code = _exitcode(proc, left())  # the child closed its pipe unreported: a signal, else no status at all
    if code is not None and code < 0:
        return code
    raise StatusLost(f"the forked run (pid {proc.pid}) ended without an exit status (forkserver said {code})")


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
        code = wait(proc, timeout)
        if code is None:
            proc.kill()
            _exitcode(proc, None)
            raise subprocess.TimeoutExpired(["compress", *args], timeout)
        return subprocess.CompletedProcess(["compress", *args], code, out.read_text(), err.read_text())
