"""Older onnxruntime releases, each installed once into its own cached venv, so every exported
file is also run on the runtime the recipe promises (`export.min_runtime`), not only the newest.

Only `compress runtime prepare` (which `make setup` runs) installs one; a run finds it prepared or stops
with one line saying how to prepare it, so a run never reaches the network. Heavy imports (torch through
onnx_lean, onnxruntime) stay inside the functions that run files: `prepare` on a ready cache takes a blink."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.diskio import writing
from ..core.errors import InputError, VerificationError
from ..core.locks import scratch_dir


@dataclass(frozen=True)
class Runtime:
    release: str           # the pip version installed for this min_runtime
    opset: int             # newest ai.onnx opset it implements
    ir: int                # newest ONNX IR version it reads
    pythons: tuple         # CPython minor versions it has wheels for
    numpy: str = "numpy>=1.24.2,<2"  # its wheels were built against NumPy 1 (and need >= 1.24.2)


# From onnxruntime's compatibility table (opset / IR per release) and its wheels on PyPI.
RUNTIMES = {
    "1.16": Runtime("1.16.3", 19, 9, (8, 9, 10, 11)),
    "1.17": Runtime("1.17.3", 20, 9, (8, 9, 10, 11, 12)),
    "1.18": Runtime("1.18.1", 21, 10, (10, 11, 12)),
}
INT8_CONV_RUNTIME = "1.24"  # first release whose CPU ConvInteger takes int8 weights (onnxruntime PR 26585)


def version_tuple(v: str) -> tuple:
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())


def installed() -> str:
    import onnxruntime
    return onnxruntime.__version__


@dataclass(frozen=True)
class OldRuntime:
    """An isolated onnxruntime: its python runs ort_runner.py on one file at a time."""
    version: str
    python: Path
    limits: Runtime


def fit_check(ex) -> None:
    """Refuse, before any work, a recipe whose files cannot run on export.min_runtime (one line, exit 2)."""
    if ex.min_runtime is None:
        return
    rt = RUNTIMES[ex.min_runtime]
    if "onnx" in ex.formats and ex.opset > rt.opset:
        raise InputError(f"export.opset {ex.opset} is newer than onnxruntime {ex.min_runtime} reads (opset <= {rt.opset}); "
                         f"set export.opset: {min(rt.opset, 18)} or raise export.min_runtime")
    if "int8_dynamic" in ex.quantize and ex.int8_dynamic_convs:
        raise InputError(f"export variant int8_dynamic with int8_dynamic_convs: true makes ConvInteger with int8 weights, "
                         f"which onnxruntime {ex.min_runtime} cannot run (needs >= {INT8_CONV_RUNTIME}); drop "
                         "int8_dynamic_convs or set export.min_runtime: null")


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def _python_for(rt: Runtime) -> str | None:
    """This interpreter if the release has wheels for it, else a python3.X on PATH that has them."""
    if sys.version_info[0] == 3 and sys.version_info[1] in rt.pythons:
        return sys.executable
    for minor in sorted(rt.pythons, reverse=True):
        found = shutil.which(f"python3.{minor}")
        if found:
            return found
    return None


# Only what running a file needs: onnxruntime's other requirements (sympy, protobuf, coloredlogs, flatbuffers,
# packaging) serve its offline tools, not InferenceSession; wheels only; no .pyc compile of what is never imported.
PIP_FLAGS = ("--no-deps", "--only-binary", ":all:", "--no-compile")


def _own_pip() -> bool:
    """This interpreter's pip can install into another venv (`pip --python`, pip >= 22.3): no pip needed there."""
    try:
        from pip import __version__ as v
    except ImportError:
        return False
    return version_tuple(v) >= (22, 3)


def _venv_flags() -> list:
    return ["--without-pip"] if _own_pip() else []


def _pip_for(python: Path) -> list:
    return [sys.executable, "-m", "pip", "--python", str(python)] if _own_pip() else [str(python), "-m", "pip"]


def _home(rt: Runtime) -> Path:
    return cache_dir() / f"ort-{rt.release}"


def find(min_runtime: str) -> OldRuntime:
    """The prepared venv for `min_runtime`; never installs (a run must not reach the network): one line
    saying how to prepare it when it is not there."""
    rt = RUNTIMES[min_runtime]
    home = _home(rt)
    how = (f"run `compress runtime prepare {min_runtime}` (`make setup` does) where the package registry is reachable, "
           "or set export.min_runtime_check: warn (or export.min_runtime: null)")
    if not (home / ".ready").exists():
        raise InputError(f"onnxruntime {rt.release} for export.min_runtime is not prepared in {home}; {how}")
    broken = _broken(home / "bin" / "python", rt)
    if broken:
        raise InputError(f"onnxruntime {rt.release} in {home} is broken ({broken}); {how.split(' (')[0]} to "
                         "repair it")
    return OldRuntime(rt.release, home / "bin" / "python", rt)


def _broken(python: Path, rt: Runtime) -> str | None:
    """Why the cached venv cannot run files, found by running its interpreter (files that exist prove nothing: a
    pyenv upgrade or an image copy leaves bin/python a dangling link); None when it runs and finds onnxruntime
    at the expected version (its metadata, read without importing it: a few tens of ms)."""
    code = "import importlib.metadata as m; print(m.version('onnxruntime'))"
    try:
        done = subprocess.run([str(python), "-I", "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"its python {python} does not run: {getattr(e, 'strerror', None) or e}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return f"its python {python} fails: {lines[-1][:160]}"
    if done.stdout.strip() != rt.release:
        return f"it holds onnxruntime {done.stdout.strip()!r}, not {rt.release}"
    return None


def prepare(min_runtime: str, log=print) -> OldRuntime:
    """The cached venv for `min_runtime`, built from the package registry the first time (then reused).
    Only `compress runtime prepare` calls this: the one place that downloads."""
    rt = RUNTIMES[min_runtime]
    home = _home(rt)
    how = f"run `compress runtime prepare {min_runtime}` again where the package registry is reachable"
    if (home / ".ready").exists():
        broken = _broken(home / "bin" / "python", rt)
        if broken is None:
            return find(min_runtime)
        log(f"runtime: the cache in {home} is broken ({broken}); rebuilding it")
        (home / ".ready").unlink(missing_ok=True)  # not ready: a run now stops naming this command, not fails later
    base = _python_for(rt)
    if base is None:
        raise InputError(f"onnxruntime {rt.release} has wheels for Python 3.{'/3.'.join(map(str, rt.pythons))} only and "
                         f"none is installed; install one of them, then {how}")
    log(f"runtime: installing onnxruntime {rt.release} into {home} (once)")
    home.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".ort-{rt.release}-", dir=home.parent))
    try:
        subprocess.run([base, "-m", "venv", str(tmp), *_venv_flags()], check=True, capture_output=True, text=True)
        subprocess.run([*_pip_for(tmp / "bin" / "python"), "install", "--quiet", "--disable-pip-version-check",
                        "--timeout", "30", "--retries", "1", *PIP_FLAGS, f"onnxruntime=={rt.release}", rt.numpy],
                       check=True, capture_output=True, text=True, timeout=900)
        got = subprocess.run([str(tmp / "bin" / "python"), "-I", "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                             check=True, capture_output=True, text=True).stdout.strip()
        if got != rt.release:
            raise subprocess.CalledProcessError(1, "pip", stderr=f"installed onnxruntime {got}")
        (tmp / ".ready").write_text(rt.release + "\n")
        if not (home / ".ready").exists():  # else another process finished first: use that one
            shutil.rmtree(home, ignore_errors=True)  # a half-built venv from an interrupted run
            os.replace(tmp, home)  # a venv's python finds its packages relative to itself: it survives the rename
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (home / ".ready").exists():
            return find(min_runtime)
        lines = (getattr(e, "stderr", None) or str(e)).strip().splitlines() or [""]
        raise InputError(f"onnxruntime {rt.release} could not be installed into {home} ({lines[-1][:160]}); {how}") from None
    shutil.rmtree(tmp, ignore_errors=True)
    return find(min_runtime)


def for_recipe(ex, log=print) -> OldRuntime | dict | None:
    """The older runtime every file must also run on, as prepared (never installed here); None when the installed
    one is that old; {onnxruntime, skipped: why} when it is missing and the recipe says to warn instead of failing."""
    if ex.min_runtime is None or "onnx" not in ex.formats:
        return None
    rt = RUNTIMES[ex.min_runtime]
    if version_tuple(installed()) <= version_tuple(rt.release):
        return None
    try:
        return find(ex.min_runtime)
    except InputError as e:
        if ex.min_runtime_check == "require":
            raise
        log(f"warning: ONNX files will not be run on onnxruntime {rt.release}: {e}")
        return {"onnxruntime": rt.release, "skipped": str(e)}


def static_check(path: Path, name: str, rt: Runtime, version: str) -> None:
    """IR version and ai.onnx opset of the file against what the runtime reads: a clear line before running it."""
    from .onnx_lean import light  # torch comes with it: only a run that has files to check pays for it

    m = light(path)
    opset = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if m.ir_version > rt.ir or opset > rt.opset:
        path.unlink()
        raise VerificationError(f"{name}: IR {m.ir_version} / opset {opset} is newer than onnxruntime {version} reads "
                                f"(IR <= {rt.ir}, opset <= {rt.opset}); not written. Lower export.opset or raise "
                                "export.min_runtime")


def run(old: OldRuntime, path: Path, name: str, x: np.ndarray, threads: int) -> np.ndarray:
    """Run the file in the isolated runtime; a runtime that refuses it fails the variant (file deleted)."""
    import numpy as np

    static_check(path, name, old.limits, old.version)
    runner = Path(__file__).with_name("ort_runner.py")
    with scratch_dir("compress-ort-") as tmp:  # swept by a later run if this one is killed
        with writing("the older runtime's input", tmp, x.nbytes):
            np.save(Path(tmp) / "x.npy", x)
        done = subprocess.run([str(old.python), "-I", str(runner), str(path), str(Path(tmp) / "x.npy"),
                               str(Path(tmp) / "y.npy"), str(threads)], capture_output=True, text=True)
        if done.returncode != 0:
            path.unlink()
            lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            raise VerificationError(f"{name}: {lines[-1][:300]}; not written. Drop this variant or set "
                                    "export.min_runtime to a newer release")
        return np.load(Path(tmp) / "y.npy")
