"""Does distillation damage a near-exact student? Whitened lowrank at 75% on the ViT teacher, then distillation.

    python -m benchmarks.near_exact [--steps 150] [--batch 64] [--images 2000]

A side experiment (issue 16), not part of `make bench`. One training run: the weights at its last
step are what distillation used to return ("final"); keep-best (distill.holdout_images) returns the
weights with the lowest held-out KL ("kept"). Agreement and KL to the teacher on test images
(never trained on) for the student before training, final and kept.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from compress.load.data import calibration_batch, loader
from compress.load.model import load
from compress.run.pipeline import distill_data, rewrite, run_distill
from compress.recipe import parse_recipe

from .bench import SHARED


@torch.no_grad()
def closeness(teacher, student, dl) -> dict:
    n = agree = 0
    kl = 0.0
    for x, _, _ in dl:
        t, s = teacher(x).double(), student(x).double()
        kl += float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        n += len(x)
    return {"agreement": agree / n, "kl": kl / n, "images": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--target", type=float, default=0.75)
    args = ap.parse_args(argv)
    train, test = SHARED / "cifar10" / "train.zip", SHARED / "cifar10" / "test.zip"
    recipe = parse_recipe({"version": 1, "passes": [{"lowrank": {"method": "whitened_svd", "target": args.target}}],
                           "calibration": {"data": str(train), "images": 32},
                           "distill": {"data": str(train), "steps": args.steps, "batch_size": args.batch, "lr": 5e-4,
                                       "warmup_steps": max(1, args.steps // 10), "device": "cpu", "workers": 1,
                                       "checkpoint_every": None}})
    loaded = load(str(SHARED / "models" / "vit_cifar10"))
    calib, _ = calibration_batch(train, loaded.data_cfg, 32, 0)
    student, _, ref, start = rewrite(loaded, recipe, calib, log=lambda _m: None)
    _, dl = loader(test, loaded.data_cfg, limit=args.images)
    before = closeness(loaded.model, student, dl)
    final = {}
    load_best = student.load_state_dict

    def grab(state, *a, **k):  # keep-best is about to swap the last step's weights out: measure those too
        final.update({n: v.clone() for n, v in student.state_dict().items()})
        return load_best(state, *a, **k)

    student.load_state_dict = grab
    with tempfile.TemporaryDirectory() as work:
        stats = run_distill(recipe, loaded, student, distill_data(recipe, None, loaded.data_cfg), calib, ref, start,
                            Path(work), resume=False, device="cpu", ckpt="vit_cifar10", log=print)
    kept = closeness(loaded.model, student, dl)
    if final:
        load_best(final)
    last = closeness(loaded.model, student, dl)
    out = {"before": before, "final (old)": last, "kept (new)": kept, "keep_best": stats["keep_best"],
           "steps": args.steps, "batch": args.batch}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
