"""onnxruntime latency: p50/p90 of ONNX files run interleaved. Imports only numpy and onnxruntime, so the
pipeline runs it as a child process (`python -I ort_timing.py SPEC.json`) once the PyTorch models are freed:
the sessions (the teacher's file included) then never share the memory peak with them.

usage: python -I ort_timing.py SPEC.json  (SPEC: paths, input_size, batch_sizes, threads, warmup, runs, seed;
prints the result as JSON on stdout)
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np


def session(path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning worker threads of one session steal the cores of the next when sessions are
    # interleaved on a small machine (measured here: p50 2x slower, p90 3x); disable it.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def latency(paths: dict[str, str], input_size, *, batch_sizes, threads: int, warmup: int, runs: int, seed: int = 0,
            keep_times: bool = False) -> dict:
    """p50/p90 ms per model and batch size; models run interleaved (alternating order) in one process.
    keep_times: also every run's ms, in round order ("times_ms"), for intervals from per-round ratios."""
    sessions = {k: session(p, threads) for k, p in paths.items()}
    rng = np.random.default_rng(seed)
    out: dict = {k: {} for k in paths}
    for bs in batch_sizes:
        x = rng.standard_normal((bs, *input_size), dtype=np.float32)
        for s in sessions.values():
            for _ in range(warmup):
                run(s, x)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for r in range(runs):
            order = list(sessions) if r % 2 == 0 else list(reversed(sessions))
            for k in order:
                t0 = time.perf_counter()
                run(sessions[k], x)
                times[k].append((time.perf_counter() - t0) * 1e3)
        for k, t in times.items():
            out[k][str(bs)] = {"p50_ms": float(np.percentile(t, 50)), "p90_ms": float(np.percentile(t, 90)), "runs": runs,
                               **({"times_ms": [round(v, 4) for v in t]} if keep_times else {})}
    return out


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    paths = spec.pop("paths")
    print(json.dumps(latency(paths, tuple(spec.pop("input_size")), **spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
