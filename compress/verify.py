"""`compress verify OUT`: re-check a result directory long after it was written (deployment gates).

Every file the report lists must still have the sha256 it was written with, and model.onnx must
still compute what the safetensors, rebuilt by `load_compressed`, compute on the same inputs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import InputError, VerificationError, read_json
from .metrics import fidelity, ort_run, ort_session


def _files(record: dict) -> list[dict]:
    arts = [a for a in [*record.get("artifacts", {}).values(), record.get("family_layout") or {}] if a.get("path")]
    return arts + [a["external_data"] for a in arts if a.get("external_data")]  # an ONNX's weights file too


def _inputs(record: dict, images: int) -> tuple[torch.Tensor, str]:
    """The run's calibration images when they are still there, else seeded N(0,1) inputs of the recorded size."""
    from .data import calibration_batch

    cal = record.get("recipe", {}).get("calibration", {})
    pre = record.get("source", {}).get("preprocess")
    data = cal.get("data")
    cfg = {**pre, "input_size": tuple(record["input_size"])} if pre else {"input_size": tuple(record["input_size"])}
    if data and Path(data).exists() and pre:
        return calibration_batch(data, cfg, images, cal.get("seed", 0))
    return calibration_batch(None, cfg, images, cal.get("seed", 0))


def verify(out: Path, images: int = 8, log=print) -> dict:
    """Raise VerificationError (exit 3) on the first kind of mismatch found; return what was checked."""
    from .load import load_compressed
    from .outdir import sha256

    report = out / "report.json"
    if not report.is_file():
        raise InputError(f"{out}: no report.json; pass a directory written by `compress apply`")
    record = read_json(report, "the result directory was altered", VerificationError)
    files = _files(record)
    if not files:
        raise InputError(f"{report} lists no artifacts; was it written by `compress apply`?")
    bad, unhashed = [], []
    for a in files:
        path = out / a["path"]
        if not path.is_file():
            bad.append(f"{a['path']} is missing")
        elif "sha256" not in a:
            unhashed.append(a["path"])
        elif sha256(path) != a["sha256"]:
            bad.append(f"{a['path']} changed (sha256 differs from the report)")
    if bad:
        raise VerificationError(f"{out}: {'; '.join(bad)}")
    checked = {"hashes": len(files) - len(unhashed), "unhashed": unhashed}
    if unhashed:
        log(f"verify: no sha256 recorded for {', '.join(unhashed)} (written before hashes were recorded); sizes only")
        sized = [a["path"] for a in files if a["path"] in unhashed and (out / a["path"]).stat().st_size != a.get("bytes")]
        if sized:
            raise VerificationError(f"{out}: {', '.join(sized)} changed size since the report was written")
    onnx_rec = record.get("artifacts", {}).get("onnx")
    if onnx_rec and (out / "model.safetensors").is_file():
        x, desc = _inputs(record, images)
        if not onnx_rec.get("dynamic_batch", True):
            x = x[:1]
        model = load_compressed(out)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(ort_run(ort_session(out / "model.onnx", 1), x.numpy()))
        fid = fidelity(ref, got)
        tol = record.get("recipe", {}).get("export", {}).get("parity_tol", 1e-4)
        if not fid["rel_diff"] <= tol:
            raise VerificationError(f"{out}: model.onnx and model.safetensors (rebuilt by load_compressed) differ by "
                                    f"{fid['rel_diff']:.2e} of the logit scale on {desc} (tolerance {tol:.0e})")
        checked["parity"] = {**fid, "inputs": desc, "tolerance": tol}
    return checked
