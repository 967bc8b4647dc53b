"""The one place a failed write becomes a user's problem, not a bug: a full disk, a quota, a read-only mount,
a closed pipe (exit 2, one line: what was being written, the space it needed when known, the fix).

Writers report these differently: OSError with an errno (Python, onnx), a SafetensorError or RuntimeError
whose text holds the OS message (safetensors, torch.save: "file write failed"). `disk_problem` reads all of
them; `writing` wraps a write, removes its temporary files and raises the InputError.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CompressError, InputError

WORDS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EROFS: "read-only file system", errno.EPIPE: "broken pipe"}
TEXTS = {"no space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
         "read-only file system": errno.EROFS, "os error 30": errno.EROFS, "broken pipe": errno.EPIPE}
LOW_S = 1 << 20  # a write that failed without saying why, on a file system with less free than this: it was full


def disk_problem(exc: BaseException, path: Path | None = None) -> int | None:
    """The errno (ENOSPC, EDQUOT, EROFS, EPIPE) behind `exc` or its causes, or None when it is something else.
    A write error that names no errno (torch.save's "file write failed") counts too where `path` is on a nearly
    full or read-only file system."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WORDS:
            return e.errno
        text = str(e).lower()
        for words, code in TEXTS.items():
            if words in text:
                return code
        e = e.__cause__ or e.__context__
    if path is not None and isinstance(exc, (OSError, RuntimeError)) and getattr(exc, "errno", None) is None:
        st = _statvfs(path)
        if st is not None and st.f_flag & os.ST_RDONLY:
            return errno.EROFS
        if st is not None and st.f_bavail * st.f_frsize < LOW_S:
            return errno.ENOSPC
    return None


def _statvfs(path: Path):
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return os.statvfs(p)
    except OSError:
        return None


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def message(code: int, what: str, path: Path | None = None, need: int | None = None) -> str:
    """One line: the problem, where, how much space (free, needed) when known, and the fix."""
    where = f" ({path})" if path is not None else ""
    space = []
    if code in (errno.ENOSPC, errno.EDQUOT) and path is not None:
        st = _statvfs(path)
        if st is not None:
            space.append(f"{_mb(st.f_bavail * st.f_frsize)} free")
    if need:
        space.append(f"about {_mb(need)} needed")
    space = f", {' and '.join(space)}" if space else ""
    in_tmp = path is not None and Path(tempfile.gettempdir()).resolve() in [Path(path).resolve(), *Path(path).resolve().parents]
    if code == errno.EPIPE:
        fix = "keep the reading end open (or send the output to a file)"
    elif code == errno.EROFS:
        fix = "set TMPDIR to a writable directory" if in_tmp else "choose a writable -o"
    else:
        fix = ("free space there or set TMPDIR to a file system with room" if in_tmp
               else "free space there or choose an -o on a file system with room")
    return f"{WORDS[code]} while writing {what}{where}{space}; {fix}"


def _remove(paths) -> None:
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except OSError:
                pass


@contextmanager
def writing(what: str, path: Path | None = None, need: int | None = None, temps=()):
    """Around a write: a full disk, quota, read-only mount or closed pipe becomes an InputError (exit 2) that
    says so, after `temps` (partial files) are removed. Anything else passes through unchanged."""
    try:
        yield
    except CompressError:  # already said (an inner write, or not a disk problem at all)
        raise
    except Exception as e:
        code = disk_problem(e, path)
        if code is None:
            raise
        _remove(temps)
        raise InputError(message(code, what, path, need)) from None


def nbytes(model) -> int:
    """A model's weights in bytes: about what its safetensors/ONNX file needs on disk."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
