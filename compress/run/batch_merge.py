"""`compress batch --merge OUT_0 OUT_1 ... -o OUT`: join the outputs of `--shard i/n` runs into one batch output.

Each entry's folder is hard-linked into OUT (copied where links are impossible, e.g. across
file systems), its manifest record kept as written, and its files re-hashed: OUT is then what
one unsharded run would have written, and `compress batch ZOO -o OUT --resume` trusts it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.diskio import writing
from ..core.errors import InputError
from .batch import Manifest, _files, _write_summary, load_zoo
from .outdir import claim, let_go, publish


def _read(folder: Path) -> tuple[dict, dict]:
    try:
        summary = json.loads((folder / "summary.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())["entries"]
    except FileNotFoundError as e:
        raise InputError(f"--merge {folder}: {Path(e.filename).name} is missing; pass folders written by "
                         "`compress batch ... --shard i/n -o FOLDER` once they finished") from None
    except (json.JSONDecodeError, KeyError) as e:
        raise InputError(f"--merge {folder}: unreadable summary or manifest ({e}); rerun that shard") from None
    return summary, manifest


def _link_tree(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def merge(shards: list[Path], out: Path, log=print) -> dict:
    if not shards:
        raise InputError("--merge: name the shard output folders, e.g. --merge out/shard-0 out/shard-1 -o out/all")
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output {out} already exists; choose another -o for the merged batch")
    read = [(folder, *_read(folder)) for folder in shards]
    zoos = {s["zoo"] for _, s, _ in read}
    if len(zoos) > 1:
        raise InputError(f"--merge: the shards ran different zoos ({', '.join(sorted(zoos))}); merge one zoo's shards")
    owner: dict[str, Path] = {}
    for folder, summary, _ in read:
        for name in summary["entries"]:
            if name in owner:
                raise InputError(f"--merge: entry '{name}' is in both {owner[name]} and {folder}; the shards overlap "
                                 "(same --shard twice, or different n); merge one run's shards")
            owner[name] = folder
    zoo = Path(zoos.pop())
    order = [j["name"] for j in load_zoo(zoo)] if zoo.is_file() else sorted(owner)
    missing = [n for n in order if n not in owner]
    if missing:
        raise InputError(f"--merge: {len(missing)} of {len(order)} zoo entries are in no shard ({', '.join(missing[:3])}"
                         f"{', ...' if len(missing) > 3 else ''}); run the missing shards first")
    held = claim(out)  # OUT's lock; OUT appears only once every entry is in place, and replaces nothing
    try:
        summary = _join(read, order, zoo, held.staging, shards)
        summary["out"] = str(out)
        _write_summary(summary, held.staging)
        publish(held)
    finally:
        let_go(held)
    log(f"merged {len(shards)} shards: {len(order)} entries into {out}")
    return summary


def _join(read: list, order: list[str], zoo: Path, out: Path, shards: list[Path]) -> dict:
    manifest = Manifest(out / "manifest.json", {})
    ran = []
    for folder, summary, entries in read:
        ran += summary["ran"]
        for name in summary["entries"]:
            record = dict(entries[name])
            if (folder / name).is_dir():
                with writing(f"the merged entry {name}", out):
                    _link_tree(folder / name, out / name)
                if record.get("state") == "done" and _files(out / name) != record.get("files"):
                    raise InputError(f"--merge: {folder / name} no longer matches its manifest (a file changed or went "
                                     f"missing); rerun that shard with --resume, then merge")
            manifest.entries[name] = record
    manifest.entries = {n: manifest.entries[n] for n in order}
    manifest.save()
    return {"zoo": str(zoo), "out": str(out), "merged": [str(f) for f in shards],
            "ran": [n for n in order if n in ran], "entries": manifest.entries}
