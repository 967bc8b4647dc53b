"""The output directory: checked against the inputs, claimed, staged beside OUT, swapped in only at the end.

A run holds `.OUT.lock` (an flock, see locks.py) from claim to release: a second run to the same OUT
stops at once, and whatever `.OUT.tmp-*` staging the lock holder finds is a killed run's, removed.
Publish looks again: it replaces only what the user allowed (--overwrite: a compress result;
--overwrite=force: anything), else the result is kept beside OUT and the run exits 2 naming it.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..core.diskio import disk_problem, message, writing
from ..core.errors import InputError
from ..core.locks import holder, try_lock, unlock


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
    with writing(path.name, path.parent, len(text.encode()), temps=[tmp]):
        tmp.write_text(text)
        os.replace(tmp, path)


SIBLING_EXTRA = len(".unpublished-") + 8  # the longest name compress makes beside OUT: OUT.unpublished-XXXXXXXX


def resolve_out(out: Path) -> Path:
    """OUT decided once, before any work. `.`, `..` and the like become the folder they name; a symlink is followed
    (the `current -> v3` layout: v3 is replaced, the link stays); OUT may not be the current directory or hold it
    (the run swaps OUT in whole by renames, which a shell standing in it would not see); a name too long for the
    names compress makes beside it (staging, lock, old) is refused naming the user's name, not ours."""
    given = Path(out)
    if given.name in ("", ".", "..") or given.is_symlink():
        out = Path(os.path.realpath(given))
    else:
        out = given
    real, cwd = Path(os.path.realpath(out)), Path(os.getcwd()).resolve()
    if real == cwd or real in cwd.parents:
        raise InputError(f"output {given} is the current directory{'' if real == cwd else ' or holds it'}; compress "
                         "replaces OUT as a whole, so name a new folder, e.g. -o result")
    parent = next((p for p in [real.parent, *real.parent.parents] if p.is_dir()), Path("/"))
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(os.fsencode(out.name))
    if size + SIBLING_EXTRA > name_max:
        raise InputError(f"output name {out.name[:32]}... is {size} bytes: too long; compress writes beside it under "
                         f"names {SIBLING_EXTRA} bytes longer and this file system allows {name_max}: choose a name "
                         f"of at most {name_max - SIBLING_EXTRA} bytes")
    return out


def check_inputs_untouched(inputs: list, out: Path) -> None:
    """The output may neither be, contain, nor sit inside any input (checkpoint, recipe, data)."""
    dst = out.resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a directory; choose a directory path for -o")
    for item in inputs:
        src = Path(item).resolve()
        if src == dst or dst in src.parents or src in dst.parents:
            raise InputError(f"output {out} overlaps the input {item}; choose an -o outside the inputs")


def is_result(path: Path) -> bool:
    """A folder `compress apply` published: its report.json is a JSON object naming the compress version.
    Only these may be replaced by plain --overwrite (a user's folder needs --overwrite=force)."""
    try:
        return "compress_version" in json.loads((path / "report.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def refusal(out: Path, overwrite) -> str | None:
    """Why `out` may not be replaced now (None: it may): absent and empty folders always may."""
    if not os.path.lexists(out):
        return None
    if not out.is_dir() or out.is_symlink():
        return "exists and is not a directory; choose a directory path for -o"
    if not any(out.iterdir()) or overwrite == "force":
        return None
    if not overwrite:
        return "already exists; pass --overwrite to replace it or choose another -o"
    if not is_result(out):
        return ("holds files that compress did not write (no report.json of a compress run) and --overwrite replaces "
                "only compress results; choose another -o, or pass --overwrite=force to replace it anyway")
    return None


@dataclass
class Claim:
    """OUT held by this run: its lock, its staging folder, and the parent folders it created."""
    out: Path
    overwrite: object = False  # False, True, or "force"
    staging: Path | None = None
    created: list = field(default_factory=list)
    lock: Path | None = None
    fd: int | None = None


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def claim(out: Path, overwrite=False, staged: bool = True) -> Claim:
    """Create OUT's parents, take `.OUT.lock` (exit 2 if another run holds it), remove what killed runs left
    and make a fresh staging folder (`staged`). Release with `let_go`, whatever happens."""
    why = refusal(out, overwrite)
    if why:
        raise InputError(f"output {out} {why}")
    c = Claim(out, overwrite)
    try:
        for p in reversed([out.parent, *out.parent.parents]):
            if not p.exists():
                p.mkdir()
                c.created.append(p)
        c.lock = lock_path(out)
        c.fd = try_lock(c.lock)
        if c.fd is None:
            who = holder(c.lock)
            raise InputError(f"output {out} is being written by another compress run ({who or 'lock ' + str(c.lock)}); "
                             "wait for it to finish or choose another -o")
        why = refusal(out, overwrite)  # again, under the lock: a run that just finished may have published
        if why:
            raise InputError(f"output {out} {why}")
        for p in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()  # we hold the lock: nobody's now
        if staged:
            c.staging = out.parent / f".{out.name}.tmp-{secrets.token_hex(4)}"
            c.staging.mkdir()
    except OSError as e:
        let_go(c)
        code = disk_problem(e, out.parent)
        if code is not None:
            raise InputError(message(code, f"the output directory {out}", out.parent)) from None
        raise InputError(f"cannot create the output directory {out} ({e.strerror or e}); choose a writable -o") from None
    except BaseException:
        let_go(c)
        raise
    return c


def let_go(c: Claim) -> None:
    """Remove the staging folder if still there (a failed run), the lock, and the parents this run created if
    nothing else went into them."""
    if c.staging is not None:
        shutil.rmtree(c.staging, ignore_errors=True)
    if c.fd is not None:
        unlock(c.fd, c.lock)
        c.fd = None
    remove_created(c.created)


def remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()  # only while empty: never what another process put there meanwhile
        except OSError:
            break


_RENAME_NOREPLACE = 1


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails (EEXIST) where `dst` exists, even as an empty folder; a plain rename would replace
    that one. Falls back to check-then-rename where renameat2 is missing (old kernels, some file systems)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        fn = None
    if fn is not None:
        AT_FDCWD = -100
        if fn(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def publish(c: Claim) -> None:
    """Swap the staging folder into place, looking at OUT again: what appeared there meanwhile is replaced only as
    --overwrite allows; else the result stays beside it (InputError naming both). A previous OUT is removed
    only after the swap."""
    out, old = c.out, None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        try:
            out.rmdir()  # an empty folder (e.g. made for us): nothing to lose
        except OSError:
            pass
    why = refusal(out, c.overwrite)
    if why is None and os.path.lexists(out):
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        os.rename(out, old)
    try:
        if why is None:
            rename_noreplace(c.staging, out)
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        why = "appeared meanwhile"
        if old is not None:  # the previous result we had moved aside: visible again, not left to a sweep
            os.rename(old, out.with_name(f"{out.name}.previous-{old.name.rsplit('-', 1)[-1]}"))
            old = None
    if why is not None:
        kept = out.with_name(f"{out.name}.unpublished-{c.staging.name.rsplit('-', 1)[-1]}")
        os.rename(c.staging, kept)
        c.staging = None
        raise InputError(f"output {out} {why.split(';')[0]} (another process wrote it while this run worked); "
                         f"this run's result is kept in {kept}: move it where you want it")
    c.staging = None
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
