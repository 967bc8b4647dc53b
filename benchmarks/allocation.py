"""How `lowrank` spreads a FLOP budget: greedy vs uniform allocation, whitened vs plain SVD basis.

    python -m benchmarks.allocation [--teacher resnet26_cifar10] [--budgets 0.5 0.3] [--steps 150]

A side experiment, not part of `make bench`: the same distillation and measurements as the
benchmark (bench.FULL), one teacher, four lowrank variants per budget. Prints a table and
writes benchmarks/results/allocation.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from compress.load.data import calibration_batch
from compress.load.model import load

from .bench import FULL, ROOT, SHARED, _save, recipe_dict, row_of, run_one
from compress.planner.search import Candidates

VARIANTS = [(m, a) for m in ("whitened_svd", "svd") for a in ("greedy", "uniform")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet26_cifar10")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--steps", type=int, default=FULL["steps"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocation.json")
    args = ap.parse_args(argv)
    cfg = {**FULL, "steps": args.steps, "train": SHARED / "cifar10" / "train.zip", "test": SHARED / "cifar10" / "test.zip"}
    ckpt = SHARED / "models" / args.teacher
    loaded = load(str(ckpt))
    calib, _ = calibration_batch(cfg["train"], loaded.data_cfg, cfg["calib_images"], 0)
    finder = Candidates(loaded, calib, [])
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="alloc-") as work:
        for b in args.budgets:
            for method, alloc in VARIANTS:
                fit = finder.dry([{"lowrank": {"method": method, "target": round(b, 4), "scope": "model", "allocate": alloc}}])
                if fit is None:
                    rows.append({"budget": b, "method": method, "allocate": alloc, "skipped": "no target meets the budget"})
                    continue
                got = run_one(f"{method}-{alloc}-{b}", recipe_dict("alloc", fit["passes"], cfg, distill=True), ckpt,
                              Path(work), lambda m: None)
                row = {"budget": b, "method": method, "allocate": alloc, "passes": fit["passes"], "calib_kl": fit["kl"]}
                row.update(row_of(got["record"]) if "record" in got else {"error": got["error"]})
                rows.append(row)
                print(f"[{time.perf_counter() - t0:5.0f}s] {b:.0%} {method:12s} {alloc:8s} " + (
                    f"params {row['params'] / 1e6:5.2f}M FLOPs {row['flops_ratio']:.1%} KL {fit['kl']:.3f} "
                    f"top-1 {100 * row['top1']:.1f} agree {100 * row['agreement']:.1f}" if "top1" in row else row.get("error", "")),
                      flush=True)
    _save(args.out, {"teacher": args.teacher, "config": {k: str(v) for k, v in cfg.items()}, "rows": rows,
                     "total_s": round(time.perf_counter() - t0, 1)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
