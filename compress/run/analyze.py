"""`compress analyze CKPT`: load, measure the blocks on calibration images, write analysis.json and analysis.png."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import InputError
from ..load.data import calibration_batch
from ..load.model import load
from ..measure.analysis import analyze, chart
from .outdir import check_inputs_untouched, claim, let_go, write_text_atomic


def run(ckpt: str, data: str | None, images: int, eps: float, out, seed: int = 0) -> dict:
    """Load, measure on `images` calibration images, write analysis.json and analysis.png into `out` atomically."""
    if images < 2:
        raise InputError(f"--images {images}: need at least 2 images")
    if eps <= 0:
        raise InputError(f"--eps {eps}: the coding-rate epsilon must be positive")
    out = Path(out)
    check_inputs_untouched([p for p in (ckpt, data) if p and Path(p).exists()], out)
    loaded = load(ckpt)
    x, desc = calibration_batch(data, loaded.data_cfg, images, seed)
    result = {"source": loaded.source, "calibration": desc, **analyze(loaded.model, loaded.adapter, x, eps)}
    held = claim(out, "force", staged=False)  # OUT's lock: two analyses into one folder cannot mix their two files
    try:
        out.mkdir(exist_ok=True)
        tmp = out / ".analysis.png.tmp"
        chart(result, tmp)
        os.replace(tmp, out / "analysis.png")
        write_text_atomic(out / "analysis.json", json.dumps(result, indent=2) + "\n")  # last: the result's marker
    except OSError as e:
        raise InputError(f"cannot write into {out} ({e.strerror or e}); choose a writable -o") from None
    finally:
        let_go(held)
    return result
