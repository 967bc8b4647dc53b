"""`python -m benchmarks.scale --quick`: a tiny ViT through the scale harness (child process, stages, peak RSS)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_scale_quick_records_stages_wall_and_outside_peak_rss(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((tmp_path / "scale.json").read_text())
    (arch, r), = data["models"].items()
    assert r["ok"], r
    assert {"load", "rewrite", "export", "measure"} <= set(r["stages_s"])
    assert r["wall_s"] >= sum(r["stages_s"].values()) * 0.99  # measured outside the run, so it includes them
    assert r["peak_rss_bytes"] > r["weights_bytes"]  # the child's own peak (torch alone is far above a tiny ViT)
    assert r["flops_ratio"] < 1 and r["onnx_files"] == ["model.onnx"] and r["latency_b1"]["speedup"] > 0
    md = (tmp_path / "scale.md").read_text()
    assert arch in md and "peak RSS" in md
