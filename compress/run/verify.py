"""`compress verify OUT`: re-check a result directory long after it was written (deployment gates).

Every file the report lists must still have the sha256 it was written with, and model.onnx must
still compute what the safetensors, rebuilt by `load_compressed`, compute on the same inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import InputError, VerificationError, read_json
from ..measure.metrics import fidelity, ort_run, ort_session


def _altered(report: Path, what: str) -> VerificationError:
    return VerificationError(f"{report}: {what}; the result directory was altered, rerun compress apply")


def _obj(d: dict, key: str, report: Path, where: str = "") -> dict:
    """d[key] as an object ({} when absent); a report edited to hold something else there is a failed check."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _altered(report, f"'{where}{key}' is a {type(v).__name__}, not an object")
    return v


def _files(record, report: Path) -> list[dict]:
    """The files report.json lists, each {path, sha256, ...}; a report altered out of that shape is a failed
    verification (exit 3) in one line, not a crash."""
    if not isinstance(record, dict):
        raise _altered(report, f"it holds a JSON {type(record).__name__}, not the object compress apply writes")
    arts = _obj(record, "artifacts", report)
    found = [_obj(arts, k, report, "artifacts.") for k in arts] + [_obj(record, "family_layout", report)]
    found += [_obj(a, "external_data", report) for a in found]  # an ONNX's weights file too
    files = []
    for a in found:
        path = a.get("path")
        if path is None:
            continue
        if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
            raise _altered(report, f"artifact path {path!r} is not a name inside the result directory")
        files.append(a)
    return files


def _inputs(record: dict, report: Path, images: int) -> tuple[torch.Tensor, str]:
    """The run's calibration images when they are still there, else seeded N(0,1) inputs of the recorded size."""
    from ..load.data import calibration_batch

    cal = _obj(_obj(record, "recipe", report), "calibration", report, "recipe.")
    pre = _obj(record, "source", report).get("preprocess")
    size = record.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise _altered(report, f"'input_size' is {size!r}, not [channels, height, width]")
    if pre is not None and not isinstance(pre, dict):
        raise _altered(report, f"'source.preprocess' is a {type(pre).__name__}, not an object")
    data, seed = cal.get("data"), cal.get("seed", 0)
    cfg = {**pre, "input_size": tuple(size)} if pre else {"input_size": tuple(size)}
    if data and Path(data).exists() and pre:
        return calibration_batch(data, cfg, images, seed)
    return calibration_batch(None, cfg, images, seed)


def verify(out: Path, images: int = 8) -> dict:
    """Raise VerificationError (exit 3) on the first kind of mismatch found; return what was checked."""
    from ..load.model import load_compressed
    from .outdir import sha256

    if not out.exists():
        raise InputError(f"{out} not found; pass a directory written by `compress apply`")
    if not out.is_dir():
        raise InputError(f"{out} is a file; pass the directory written by `compress apply` (the one holding report.json)")
    report = out / "report.json"
    if not report.is_file():
        raise InputError(f"{out}: no report.json; pass a directory written by `compress apply`")
    record = read_json(report, "the result directory was altered", VerificationError)
    files = _files(record, report)
    if not files:
        raise InputError(f"{report} lists no artifacts; was it written by `compress apply`?")
    bad = []
    for a in files:
        path = out / a["path"]
        if not path.exists():
            bad.append(f"{a['path']} is missing")
        elif not isinstance(a.get("sha256"), str):  # a deployment gate passes nothing it cannot check
            bad.append(f"{a['path']} has no sha256 in report.json, so it cannot be checked (the report was edited)")
        elif sha256(path) != a["sha256"]:
            bad.append(f"{a['path']} changed (sha256 differs from the report)")
    if bad:
        raise VerificationError(f"{out}: {'; '.join(bad)}")
    checked = {"hashes": len(files)}
    onnx_rec = _obj(record, "artifacts", report).get("onnx")
    if onnx_rec and (out / "model.safetensors").is_file():
        x, desc = _inputs(record, report, images)
        if not onnx_rec.get("dynamic_batch", True):
            x = x[:1]
        model = load_compressed(out)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(ort_run(ort_session(out / "model.onnx", 1), x.numpy()))
        fid = fidelity(ref, got)
        tol = _obj(_obj(record, "recipe", report), "export", report, "recipe.").get("parity_tol", 1e-4)
        if not isinstance(tol, (int, float)):
            raise _altered(report, f"'recipe.export.parity_tol' is {tol!r}, not a number")
        if not fid["rel_diff"] <= tol:
            raise VerificationError(f"{out}: model.onnx and model.safetensors (rebuilt by load_compressed) differ by "
                                    f"{fid['rel_diff']:.2e} of the logit scale on {desc} (tolerance {tol:.0e})")
        checked["parity"] = {**fid, "inputs": desc, "tolerance": tol}
    return checked
