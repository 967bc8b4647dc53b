"""User-facing failures: one line that names the problem and the fix, and a documented exit code."""
import json
from pathlib import Path


class CompressError(Exception):
    """Base class; the CLI prints `error: <message>` and exits with `exit_code` (no traceback)."""

    exit_code = 2


class InputError(CompressError):
    """Bad checkpoint, recipe, data or output path (exit 2)."""

    exit_code = 2


class VerificationError(CompressError):
    """A pass declared exact changed the outputs, or an export failed its parity check (exit 3)."""

    exit_code = 3


class GateError(CompressError):
    """The run worked but missed a target in the recipe's `gates:` (exit 4)."""

    exit_code = 4


class TargetError(GateError):
    """A recipe's `target:` is out of reach: no candidate the planner measured meets it (exit 4)."""

    exit_code = 4


def read_json(path: Path, fix: str, error: type = InputError):
    """A JSON file's content, or `error` (an InputError unless the caller says what a bad file means) in one
    line: the file, the parser's words, and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}); {fix}") from None


def not_a_file(path: Path) -> str | None:
    """What a path that is no regular file is, in words (the fix differs: a folder, a pipe, a loop); None when
    there is simply nothing there."""
    import errno
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symlink loop (a link that points back to itself)"
        if e.errno == errno.EACCES:
            return "cannot be reached (permission denied)"
        return "is a dangling symlink (its target is missing)" if os.path.islink(path) else None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a pipe, not a file (save it to a file first)"
    return "is not a regular file (a device or socket)"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop: Kubernetes eviction, Slurm time limit), handled like Ctrl-C (exit 143)."""


def _raise_terminated(signum, frame):
    if _importing(frame):
        # An exception thrown into a module being imported leaves it half-initialised in sys.modules; the
        # next import of it can then recurse forever (numpy's __getattr__ -> RecursionError, exit 1, seen
        # when SIGTERM reached a `compress batch` entry that was just starting). Ask again once it is done.
        import os
        import threading

        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise Terminated()


def _importing(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def terminate_like_interrupt() -> None:
    """From now on SIGTERM raises Terminated in the main thread, so cleanup runs as for SIGINT."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


_HOLD_AFTER_PUBLISH = [False]


def hold_after_publish() -> None:
    """The CLI's: once OUT is published the process exits 0 whatever signal comes after (see `publishing`)."""
    _HOLD_AFTER_PUBLISH[0] = True


class publishing:
    """Hold SIGINT/SIGTERM from just before OUT's rename: a signal then is remembered, not raised, so a complete
    OUT is never reported as a failure (a scheduler recording 143 and a rerun finding "already exists"). If the
    publish fails, the handlers come back and a held signal is delivered (130/143 as before); if it succeeds, the
    CLI keeps them held until it exits 0, and any other caller gets them back, a held one delivered."""

    def __enter__(self):
        import signal
        import threading

        self.old, self.pending = {}, []
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, lambda n, f: self.pending.append(n))
        return self

    def __exit__(self, kind, value, tb):
        import os
        import signal

        if kind is None and _HOLD_AFTER_PUBLISH[0]:
            return False
        for s, h in self.old.items():
            signal.signal(s, h)
        for n in self.pending:
            os.kill(os.getpid(), n)
        return False
