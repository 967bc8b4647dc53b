"""Train a CIFAR-10 teacher (timm ViT or ResNet) from the shared zips, so the zoo can be rebuilt.

    python -m benchmarks.train_teacher {vit,resnet} -o OUT [--epochs E | --steps N] [--device auto]

Writes a timm directory like ../shared/data/models/*: config.json (architecture, model_args,
pretrained_cfg with mean/std/input size/label names) + model.safetensors, and training.json
with the settings, the loss curve and the test top-1. CUDA (bf16 autocast) when present.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from compress.load.data import Augmented, collate, dataset, loader
from compress.distill.train import StepBatches
from compress.load.model import load
from compress.measure.metrics import evaluate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
# The shared teachers' shapes: a 6-block width-192 ViT on 4x4 patches of 32x32, a resnet26 at 64x64.
PRESETS = {
    "vit": {"architecture": "vit_tiny_patch16_224", "model_args": {"img_size": 32, "patch_size": 4, "depth": 6, "mlp_ratio": 2.0},
            "input_size": [3, 32, 32], "interpolation": "bicubic", "fixed_input_size": True, "lr": 1e-3},
    "resnet": {"architecture": "resnet26", "model_args": {}, "input_size": [3, 64, 64], "interpolation": "bilinear",
               "fixed_input_size": False, "lr": 2e-3},
}


def pretrained_cfg(p: dict, classes: list[str]) -> dict:
    return {"input_size": p["input_size"], "fixed_input_size": p["fixed_input_size"], "interpolation": p["interpolation"],
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD),
            "num_classes": len(classes), "label_names": classes}


def train(kind: str, out: Path, *, train_data: Path, test_data: Path, epochs: float | None, steps: int | None,
          batch_size: int, lr: float | None, device: str, seed: int, eval_images: int | None, workers: int, log=print) -> dict:
    p = PRESETS[kind]
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    torch.manual_seed(seed)
    data_cfg = {"input_size": tuple(p["input_size"]), "interpolation": p["interpolation"], "mean": CIFAR_MEAN,
                "std": CIFAR_STD, "crop_pct": 1.0, "crop_mode": "center"}
    data = dataset(train_data, data_cfg)
    model = timm.create_model(p["architecture"], pretrained=False, num_classes=len(data.classes), **p["model_args"]).to(dev)
    steps = steps or math.ceil((epochs or 1.0) * len(data) / batch_size)
    lr = lr or p["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    dl = torch.utils.data.DataLoader(Augmented(data), batch_sampler=StepBatches(len(data), batch_size, seed, 0, steps),
                                     collate_fn=collate, num_workers=workers, pin_memory=dev.type == "cuda")
    use_amp = dev.type == "cuda"
    if use_amp:
        model.to(memory_format=torch.channels_last)
    log(f"training {p['architecture']} {p['model_args']} on {dev}: {steps} steps of {batch_size} images, lr {lr}")
    model.train()
    history, t0, images = [], time.perf_counter(), 0
    for step, (x, y, _bad) in enumerate(dl):
        if x is None:
            continue
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if use_amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(float(loss.detach()))
        images += len(x)
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            log(f"  step {step + 1}/{steps}: loss {history[-1]:.4f}, {images / (time.perf_counter() - t0):.0f} images/s")
    seconds = time.perf_counter() - t0
    model.eval().to("cpu", memory_format=torch.contiguous_format)

    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": p["architecture"], "num_classes": len(data.classes), "model_args": p["model_args"],
              "pretrained_cfg": pretrained_cfg(p, data.classes)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    reloaded = load(str(out))  # the directory must load the way every teacher is loaded
    _, test = loader(test_data, reloaded.data_cfg, limit=eval_images, batch_size=256)
    ev = evaluate({"teacher": reloaded.model, "student": reloaded.model}, test)
    info = {"architecture": p["architecture"], "model_args": p["model_args"], "device": str(dev), "amp_bf16": use_amp,
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(seconds, 1),
            "images_per_s": images / seconds if seconds else None, "final_loss": history[-1] if history else None,
            "test_top1": ev.get("teacher_top1"), "test_images": ev["images"], "loss_history": history}
    (out / "training.json").write_text(json.dumps(info))
    log(f"wrote {out}: test top-1 {100 * info['test_top1']:.1f}% on {ev['images']} images, trained in {seconds:.0f} s")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=sorted(PRESETS))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--epochs", type=float, help="passes over the training set (default 1)")
    ap.add_argument("--steps", type=int, help="optimizer steps instead of epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, help="peak AdamW learning rate (default per architecture)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-data", type=Path, default=SHARED / "cifar10" / "train.zip")
    ap.add_argument("--test-data", type=Path, default=SHARED / "cifar10" / "test.zip")
    ap.add_argument("--eval-images", type=int, help="evenly spaced test subset (default: all 10,000)")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if a.epochs and a.steps:
        ap.error("give --epochs or --steps, not both")
    train(a.kind, a.out, train_data=a.train_data, test_data=a.test_data, epochs=a.epochs, steps=a.steps,
          batch_size=a.batch_size, lr=a.lr, device=a.device, seed=a.seed, eval_images=a.eval_images, workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
