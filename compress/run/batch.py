"""`compress batch`: convert a model zoo, one process per entry, with a manifest that survives kills.

Each entry runs `compress apply` in its own process (a crash or out-of-memory there cannot
take the others down), forked from one that has imported compress already (compress/run/forkrun.py). The manifest records every entry's state and, once done, the
sha256 of every file it wrote; `--resume` skips entries whose inputs are unchanged and whose
files still match, and retries the rest.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.errors import InputError
from ..recipe import _check_keys, _fmt, read_yaml
from . import forkrun
from .outdir import check_inputs_untouched, claim, let_go, write_text_atomic

PARTIAL_FAILURE = 5  # exit code: the batch ran, and at least one entry failed
RUNNING: set = set()  # entries' processes now running: told to stop when the batch is stopped
RUNNING_LOCK = threading.Lock()


class ZooEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str
    recipe: Optional[Path] = None
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="output folder name under OUT")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the recipe (nested keys)")


class Zoo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    recipe: Optional[Path] = Field(None, description="default recipe for entries that name none")
    entries: list[ZooEntry] = Field(min_length=1)


def load_zoo(path: Path) -> list[dict]:
    """Parse and check the zoo file; returns one resolved job per entry (paths absolute)."""
    data = read_yaml(path, "zoo", "see docs/batch.md")
    if not isinstance(data, dict):
        raise InputError(f"zoo {path}: the top level must be a mapping with 'version: 1' and 'entries:'")
    try:
        _check_keys(data, Zoo, "")
        zoo = Zoo.model_validate(data)
    except InputError as e:
        raise InputError(str(e).replace("recipe: ", f"zoo {path.name}: ", 1)) from None
    except ValidationError as e:
        raise InputError(f"zoo {path.name}: {_fmt(e, '')}") from None
    base = path.resolve().parent
    jobs, seen = [], set()
    for i, e in enumerate(zoo.entries):
        recipe = e.recipe or zoo.recipe
        if recipe is None:
            raise InputError(f"zoo {path.name}: entries[{i}] names no recipe and the zoo has no default 'recipe:'")
        ckpt = e.checkpoint if e.checkpoint.startswith(("timm:", "hf:")) else str((base / e.checkpoint).resolve())
        name = e.name or Path(e.checkpoint.rstrip("/")).stem.replace(":", "-")
        if name in seen:
            raise InputError(f"zoo {path.name}: entries[{i}]: name '{name}' is used twice; give each entry a unique name")
        seen.add(name)
        jobs.append({"name": name, "checkpoint": ckpt, "recipe": str((base / recipe).resolve()), "overrides": e.overrides})
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' with 0 <= i < n (Slurm's SLURM_ARRAY_TASK_ID from 0, Kubernetes' JOB_COMPLETION_INDEX)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise InputError(f"--shard {text!r}: use i/n with 0 <= i < n, e.g. --shard 0/4 ... --shard 3/4")
    return i, n


def shard_of(name: str, n: int) -> int:
    """The shard an entry belongs to: its name's sha256 mod n. Stable across machines, runs and zoo edits
    (adding or removing one entry never moves another), so every task of an array job agrees."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % n


def _fingerprint(job: dict) -> str:
    """Changes when an entry's inputs change (paths, sizes, mtimes, recipe text, overrides)."""
    h = hashlib.sha256(json.dumps([job["checkpoint"], job["recipe"], job["overrides"]], sort_keys=True).encode())
    for p in (Path(job["checkpoint"]), Path(job["recipe"])):
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                st = f.stat()
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def verified(name: str, entry: dict, out: Path) -> bool:
    """Done entries count only while every file they wrote is still there, unchanged."""
    folder = out / name
    return entry.get("state") == "done" and folder.is_dir() and _files(folder) == entry.get("files")


class Manifest:
    """manifest.json under OUT, rewritten atomically on every state change (threads share it)."""

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries, self.lock = path, entries, threading.Lock()

    @classmethod
    def open(cls, path: Path, resume: bool) -> "Manifest":
        if resume and path.is_file():
            return cls(path, read_manifest(path))
        return cls(path, {})

    def update(self, name: str, **fields) -> None:
        with self.lock:
            self.entries.setdefault(name, {}).update(fields)
            self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps({"version": 1, "entries": self.entries}, indent=2))


def read_manifest(path: Path) -> dict:
    """manifest.json's entries, checked: {"version": 1, "entries": {name: {...}}}; anything else is one line."""
    fix = f"move {path.parent} aside, or run without --resume into an empty -o"
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--resume: {path} is not valid JSON ({e}); {fix}") from None
    except OSError as e:
        raise InputError(f"--resume: cannot read {path} ({e.strerror or e}); {fix}") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not (isinstance(data, dict) and data.get("version") == 1 and isinstance(entries, dict)
            and all(isinstance(e, dict) for e in entries.values())):
        raise InputError(f"--resume: {path} is not a compress batch manifest (expected {{\"version\": 1, \"entries\": "
                         f"{{NAME: {{...}}}}}}); {fix}")
    return entries


def _die_with_parent() -> None:
    """Linux: a child gets SIGKILL when the batch process dies, so no orphan keeps writing."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _start(entry, cmd: list[str], keep, scratch: Path) -> subprocess.CompletedProcess:
    """`compress apply` for one entry: forked from a process that has imported compress (compress/run/forkrun.py: no
    ~5 s of imports an entry), or `python -m compress` where there is no forkserver. `keep(proc)` registers it;
    its output files live in `scratch` (beside OUT, under its lock: what a killed batch leaves, the next removes)."""
    if forkrun.available():
        return forkrun.run(entry, cmd, Path.cwd(), None, timeout=None, die_with_parent=True, started=keep, scratch=scratch)
    proc = subprocess.Popen([sys.executable, "-m", "compress", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_die_with_parent if os.name == "posix" else None)
    keep(proc)
    stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _stop(proc) -> None:
    """SIGTERM to an entry's process (a subprocess.Popen or a forked multiprocessing.Process)."""
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, TypeError):  # already gone, or not started yet
        pass


def _run_entry(entry, job: dict, out: Path, manifest: Manifest, log, scratch: Path) -> None:
    name = job["name"]
    cmd = ["apply", job["recipe"], job["checkpoint"], "-o", str(out / name), "--overwrite", "--json"]
    if job["overrides"]:
        cmd += ["--override", json.dumps(job["overrides"])]
    manifest.update(name, state="running", started=time.time(), checkpoint=job["checkpoint"], recipe=job["recipe"],
                    fingerprint=_fingerprint(job), attempts=manifest.entries.get(name, {}).get("attempts", 0) + 1)
    t0 = time.perf_counter()
    mine = []

    def keep(proc):
        with RUNNING_LOCK:
            RUNNING.add(proc)
            mine.append(proc)

    try:
        proc = _start(entry, cmd, keep, scratch)
    except forkrun.StatusLost as e:  # never a number it did not exit with: failed, and --resume retries it
        seconds = round(time.perf_counter() - t0, 1)
        manifest.update(name, state="failed", exit_code=None, seconds=seconds, error=f"exit status lost ({e})", files=None)
        log(f"failed  {name}: exit status lost; --resume retries it")
        return
    finally:
        with RUNNING_LOCK:
            for p in mine:
                RUNNING.discard(p)
    seconds = round(time.perf_counter() - t0, 1)
    if proc.returncode == 0:
        record = json.loads(proc.stdout)
        manifest.update(name, state="done", exit_code=0, seconds=seconds, error=None,
                        result=_result(record), files=_files(out / name))
        log(f"done    {name} ({seconds:.0f} s)")
        return
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith(("error:", "internal error:"))]
    if proc.returncode < 0:
        error = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if -proc.returncode == signal.SIGKILL else "")
    else:
        error = lines[-1] if lines else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    manifest.update(name, state="failed", exit_code=proc.returncode, seconds=seconds, error=error, files=None)
    log(f"failed  {name}: {error}")


def _result(record: dict) -> dict:
    s = record["summary"]
    lat = s.get("latency") or {}
    bs = max(lat, key=int) if lat else None
    ev = s.get("eval") or {}
    return {"params_ratio": s["params"]["ratio"], "flops_ratio": s["flops"]["ratio"],
            "onnx_ratio": (s.get("onnx_bytes") or {}).get("ratio"),
            "speedup": lat[bs]["speedup"] if bs else None, "speedup_batch": bs,
            "top1_drop": (100 * (ev["teacher_top1"] - ev["student_top1"])) if "teacher_top1" in ev else None}


def run_batch(zoo_path: Path, out: Path, *, entry, jobs: int, resume: bool, shard: tuple[int, int] | None = None,
              log=print) -> dict:
    """entry: the CLI's main, which each entry's forked child runs (`compress apply ...`)."""
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: use 1 or more")
    entries = load_zoo(zoo_path)
    if shard is not None:
        entries = [j for j in entries if shard_of(j["name"], shard[1]) == shard[0]]
        log(f"batch: shard {shard[0]}/{shard[1]} holds {len(entries)} entries")
    check_inputs_untouched([zoo_path, *[j["recipe"] for j in entries],
                            *[j["checkpoint"] for j in entries if Path(j["checkpoint"]).exists()]], out)
    if out.exists() and not resume and any(out.iterdir()):
        raise InputError(f"output {out} already exists; pass --resume to continue that batch or choose another -o")
    if resume and out.is_dir() and any(out.iterdir()):  # a folder that is not a batch's: never written into
        if not (out / "manifest.json").is_file():
            raise InputError(f"--resume: {out} holds no manifest.json, so it is not the output of a compress batch; "
                             "choose the batch's -o, or an empty or new one")
        read_manifest(out / "manifest.json")
    held = claim(out, "force")  # OUT's lock for the whole batch: a second batch to it stops at once; its staging
    try:  # folder beside OUT holds the entries' output while they run
        return _run_held(entry, entries, zoo_path, out, jobs=jobs, resume=resume, shard=shard, log=log, scratch=held.staging)
    finally:
        let_go(held)


def _run_held(entry, entries: list, zoo_path: Path, out: Path, *, jobs: int, resume: bool, shard, log, scratch: Path) -> dict:
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the output directory {out} ({e.strerror or e}); choose a writable -o") from None
    manifest = Manifest.open(out / "manifest.json", resume)
    todo = []
    for job in entries:
        prev = manifest.entries.get(job["name"], {})
        if resume and verified(job["name"], prev, out) and prev.get("fingerprint") == _fingerprint(job):
            log(f"skip    {job['name']} (done and verified)")
            continue
        manifest.update(job["name"], state="pending")
        todo.append(job)
    log(f"batch: {len(todo)} of {len(entries)} entries to run, {jobs} at a time")
    if not todo:  # an empty shard (few entries, many tasks) still leaves a manifest to merge
        manifest.save()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        try:
            list(pool.map(lambda j: _run_entry(entry, j, out, manifest, log, scratch), todo))
        except BaseException:  # Ctrl-C or SIGTERM: pass it on, so each entry stops cleanly and is recorded failed
            pool.shutdown(wait=False, cancel_futures=True)
            with RUNNING_LOCK:
                for proc in RUNNING:
                    _stop(proc)
            raise
    names = [j["name"] for j in entries]
    summary = {"zoo": str(zoo_path), "out": str(out), "ran": [j["name"] for j in todo],
               "entries": {n: manifest.entries[n] for n in names}}
    if shard is not None:
        summary["shard"] = f"{shard[0]}/{shard[1]}"
    _write_summary(summary, out)
    return summary


def summary_rows(summary: dict) -> list[tuple]:
    rows = [("entry", "state", "params", "ONNX size", "speedup", "top-1 drop", "note")]
    for name, e in summary["entries"].items():
        r = e.get("result") or {}

        def pct(v):
            return f"{100 * (v - 1):+.1f}%" if v is not None else "-"
        rows.append((name, e["state"], pct(r.get("params_ratio")), pct(r.get("onnx_ratio")),
                     f"{r['speedup']:.2f}x (b{r['speedup_batch']})" if r.get("speedup") else "-",
                     f"{r['top1_drop']:+.2f} pts" if r.get("top1_drop") is not None else "-",
                     e.get("error") or ("skipped: already done" if name not in summary["ran"] else "")))
    return rows


def _write_summary(summary: dict, out: Path) -> None:
    rows = summary_rows(summary)
    md = ["# compress batch summary", "", f"Zoo `{summary['zoo']}`; every figure comes from that entry's own report.", "",
          "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    md += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    write_text_atomic(out / "summary.md", "\n".join(md) + "\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")

