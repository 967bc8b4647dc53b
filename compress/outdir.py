"""The output directory: checked against the inputs, staged beside OUT, swapped in only at the end.

A killed run leaves at most a hidden `.OUT.tmp-PID` folder (removed by the next run once
that process is gone), never a half-written OUT.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .errors import InputError


def sha256(path: Path) -> str:
    """A file's hash as recorded in report.json (`compress verify` checks it later); a directory (e.g. the
    Hugging Face layout written back) hashes each file's relative name and hash, in sorted order."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path).as_posix()}\0{sha256(f)}\n".encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write beside, then rename: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_inputs_untouched(inputs: list, out: Path) -> None:
    """The output may neither be, contain, nor sit inside any input (checkpoint, recipe, data)."""
    dst = out.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose a directory path for -o")
    for item in inputs:
        src = Path(item).resolve()
        if src == dst or dst in src.parents or src in dst.parents:
            raise InputError(f"output {out} overlaps the input {item}; choose an -o outside the inputs")


def stage(out: Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """A fresh staging directory beside OUT; returns it and the parent dirs this run created."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"output {out} already exists; pass --overwrite to replace it or choose another -o")
    created = []
    parent = out.parent
    try:
        for p in reversed([parent, *parent.parents]):
            if not p.exists():
                p.mkdir()
                created.append(p)
        _clear_stale(parent, out.name)
        staging = parent / f".{out.name}.tmp-{os.getpid()}"
        staging.mkdir()
    except OSError as e:
        remove_created(created)
        raise InputError(f"cannot create the output directory {out} ({e.strerror or e}); choose a writable -o") from None
    return staging, created


def _clear_stale(parent: Path, name: str) -> None:
    """Remove staging dirs left by runs that were killed (their process is gone)."""
    for p in parent.glob(f".{name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        shutil.rmtree(p, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Swap the verified staging dir into place; a previous OUT is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
