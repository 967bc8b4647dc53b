"""Locks that die with their process: `fcntl.flock` on a file.

A PID in a name cannot tell a dead run from a live one: in a fresh PID namespace (a container's
rerun) the new run has the PID of the killed one. An flock is released by the kernel when its
holder dies, whatever the namespace, so "its lock is not held" is what marks a leftover as stale.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

UNLOCKED_GRACE_S = 60  # a scratch dir without its lock file is another run's, between mkdtemp and lock: young ones stay
_HELD: set[int] = set()  # fds of the locks this process holds


def _drop_inherited() -> None:
    """In a forked child (DataLoader workers): close its copies of our lock fds. An flock belongs to the open file,
    which a fork shares: a worker outliving a SIGKILLed run would otherwise hold the run's lock on."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited)


def try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on `path` (created if missing), or None when a live process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # its previous holder may have unlinked the file between our open and our lock: lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)  # who holds it, for the message another run prints (never used to decide)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode())
                _HELD.add(fd)
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def holder(path: Path) -> str:
    """Who holds the lock at `path`, as it wrote it (for an error line), or ''."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def unlock(fd: int, path: Path) -> None:
    """Remove the lock file while still holding it (no one can lock a file that is gone), then let go."""
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except OSError:
        pass
    _HELD.discard(fd)
    os.close(fd)


def is_held(path: Path) -> bool:
    """Whether a live process holds the flock on `path` (False when there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def sweep_scratch(root: Path, prefix: str) -> None:
    """Remove the `compress-*` scratch dirs whose run is gone (their `.lock` is not held), e.g. after a SIGKILL;
    of `prefix`, also those without a lock that are older than a run takes to lock one (written before locks)."""
    for p in root.glob("compress-*"):
        try:
            if not p.is_dir():
                continue
            lock = p / ".lock"
            if lock.exists():
                fd = try_lock(lock)
                if fd is not None:  # nobody holds it: its run died; remove while holding it
                    shutil.rmtree(p, ignore_errors=True)
                    _HELD.discard(fd)
                    os.close(fd)
            elif p.name.startswith(prefix) and time.time() - p.stat().st_mtime > UNLOCKED_GRACE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:  # another user's, or gone meanwhile: not ours to judge
            continue


@contextmanager
def scratch_dir(prefix: str):
    """A temporary directory under $TMPDIR that the next run removes if this one is killed (SIGKILL runs no
    cleanup): it holds a `.lock` for as long as it lives. Leftovers of earlier runs are swept first."""
    root = Path(tempfile.gettempdir())
    sweep_scratch(root, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    fd = try_lock(path / ".lock")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if fd is not None:
            _HELD.discard(fd)
            os.close(fd)
