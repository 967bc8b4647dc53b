"""GPU section: distillation images/s on the device, and the share of its peak bf16 FLOP/s reached.

Runs when CUDA is present (the device tool lends an H100/H200 to some tasks). Two figures per
teacher, student = a copy of the teacher (the heaviest student any budget gives):
- `loop`: the pipeline's own `compress.distill.train.distill` on `cifar10/train.zip` (data loading,
  augmentation and all), after a warm-up call;
- `compute`: the same step (teacher forward, KD loss, student forward + backward, AdamW) on a
  batch already on the device, so data loading is out of it.
Achieved FLOP/s = images/s x (teacher forward + 3 x student forward FLOPs per image); the
backward pass is counted as twice the forward, the usual convention. The same code runs on
CPU in the test (no peak is known for a CPU, so no share is given there).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from compress.load.data import dataset
from compress.distill.train import distill, kd_loss
from compress.load.model import load
from compress.measure.metrics import count_flops

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets; first match on the device name wins.
PEAK_BF16 = [("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12),
             ("GH200", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362.05e12), ("L4", 121e12),
             ("A10", 125e12)]


def peak_bf16(name: str) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when this table does not know it."""
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _compute_rate(student, teacher, x, *, steps: int, warmup: int, amp: bool) -> float:
    """Images/s of the distillation step on a resident batch (no data loading)."""
    dev = x.device
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    student.train()

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                t = teacher(x)
            loss = kd_loss(student(x).float(), t.float(), 2.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return steps * len(x) / (time.perf_counter() - t0)


def measure(ckpt: Path, train: Path, *, device: str = "cuda", batch_size: int = 256, steps: int = 50, warmup: int = 10,
            workers: int = 8) -> dict:
    """Both rates for one teacher, the FLOPs behind them, and the share of the device's peak."""
    dev = torch.device(device)
    loaded = load(str(ckpt))
    teacher, size = loaded.model.eval(), tuple(loaded.data_cfg["input_size"])
    per_image = count_flops(teacher, size) * 4  # teacher forward + student (= teacher copy) forward and backward
    amp = dev.type == "cuda"
    data = dataset(train, loaded.data_cfg)
    common = dict(batch_size=batch_size, lr=1e-4, weight_decay=0.05, warmup_steps=1, temperature=2.0, feature_weight=0.0,
                  label_weight=0.0, features=None, seed=0, device=dev, amp=amp, workers=workers, checkpoint=None,
                  checkpoint_every=None, resume=False, fingerprint="bench-gpu", log=lambda _m: None)
    student = copy.deepcopy(teacher)
    distill(student, teacher, data, steps=warmup, **common)  # warm-up: kernels, allocator, workers
    loop = distill(student, teacher, data, steps=steps, **common)["images_per_s"]
    student, teacher = student.to(dev), teacher.to(dev)
    x = torch.randn((batch_size, *size), device=dev)
    if dev.type == "cuda":  # as the pipeline's distillation does on CUDA
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    compute = _compute_rate(student, teacher, x, steps=steps, warmup=warmup, amp=amp)
    name = device_name(dev)
    peak = peak_bf16(name) if dev.type == "cuda" else None
    rates = {"loop": loop, "compute": compute}
    return {"teacher": ckpt.name, "device": name, "input_size": list(size), "batch_size": batch_size, "steps": steps,
            "amp_bf16": amp, "train_flops_per_image": per_image, "peak_bf16_flops": peak,
            **{f"{k}_images_per_s": v for k, v in rates.items()},
            **{f"{k}_flops_per_s": v * per_image for k, v in rates.items()},
            **{f"{k}_share_of_peak": (v * per_image / peak if peak else None) for k, v in rates.items()}}


def run(ckpts: list[Path], train: Path, log, **kw) -> dict | None:
    """The GPU section's data, or None when no CUDA device is present."""
    if not torch.cuda.is_available():
        return None
    rows = []
    for ckpt in ckpts:
        log(f"GPU: distillation throughput of {ckpt.name} on {device_name(torch.device('cuda'))}")
        rows.append(measure(ckpt, train, **kw))
    return {"rows": rows, "torch_cuda": torch.version.cuda, "device": rows[0]["device"] if rows else None}
