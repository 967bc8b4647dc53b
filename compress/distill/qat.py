"""Quantization-aware fine-tune for int8_static (export.int8_qat_steps), when post-training quantization misses.

The student is distilled from the teacher for a few steps (compress/distill/train.py's loop, loss and data) with fake int8
in its forward: every convolution's and linear layer's weight rounded per output channel (symmetric int8, as
onnxruntime's QDQ quantizer does it) and its input rounded per tensor (uint8, range observed on the images seen),
both straight-through. The weights learn to sit where rounding costs least; the float weights are then exported and
quantized by the same onnxruntime static path, and that file is kept only when it is closer to model.onnx.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver, disable_observer
from torch.nn.utils import parametrize

from ..core.errors import VerificationError
from ..export.quant import Bound
from ..export.write import write_int8, write_onnx
from .train import distill

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)  # what onnxruntime's QDQ quantizer makes int8 (Conv, MatMul, Gemm)
# A trained student moves only a little for rounding: a tenth of the distillation lr (the usual QAT fine-tune rate)
# keeps a few hundred steps from undoing what distillation reached.
LR_SCALE = 0.1
INPUT_FQ, OUTPUT_FQ = "_qat_input", "_qat_output"  # fake-quantizers' names on each layer (submodules: they follow .to())


class WeightFake(nn.Module):
    """Per-output-channel symmetric int8 rounding of a weight, straight-through (a parametrization). Its scale is
    the channel's max |w| / 127 of the weight as it is now, as the quantizer will compute it from the exported one.
    A BatchNorm after a convolution folds into the weight as one factor per output channel: the same rounding."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = (w.detach().abs().flatten(1).amax(1) / 127).clamp_min(1e-12).float()
        zero = torch.zeros(len(scale), dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -127, 127).to(w.dtype)


def _input_fake(module, args):
    return (getattr(module, INPUT_FQ)(args[0]), *args[1:])


def _output_fake(module, args, out):
    return getattr(module, OUTPUT_FQ)(out)


def _activation_fake() -> FakeQuantize:
    """uint8 per-tensor, the range a moving min/max of what it sees (onnxruntime's activations: QUInt8, minmax)."""
    return FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8,
                        qscheme=torch.per_tensor_affine)


def attach(model: nn.Module, calib: torch.Tensor) -> list:
    """Fake int8 on every conv/linear of `model` (in place); input ranges initialised on `calib`. Returns the hooks."""
    hooks = []
    for m in model.modules():
        if isinstance(m, LAYERS):
            parametrize.register_parametrization(m, "weight", WeightFake())
            m.add_module(INPUT_FQ, _activation_fake())
            m.add_module(OUTPUT_FQ, _activation_fake())  # the quantizer rounds each layer's output too (the logits)
            hooks += [m.register_forward_pre_hook(_input_fake), m.register_forward_hook(_output_fake)]
    was = model.training
    with torch.no_grad():
        model.eval()(calib)  # the ranges: the calibration images', as the quantizer's minmax will find them
    model.apply(disable_observer)  # and kept: training learns around the ranges the int8 file will have
    model.train(was)
    return hooks


def detach(model: nn.Module, hooks: list) -> None:
    """Back to a plain float model: the learned float weights kept (not their rounded copies), fake-quant removed."""
    for h in hooks:
        h.remove()
    for m in model.modules():
        if isinstance(m, LAYERS) and parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            del m._modules[INPUT_FQ], m._modules[OUTPUT_FQ]


def finetune(student: nn.Module, teacher: nn.Module, train, d, steps: int, calib: torch.Tensor, *,
             device: torch.device, adapter=None, log=print) -> tuple[nn.Module, dict]:
    """A fake-quantized copy of `student` distilled from `teacher` for `steps` steps with the distill: settings `d`
    (BatchNorm statistics frozen: a short run's batch statistics are noisier than the trained ones, and frozen they
    fold into the weights as the rounding assumes). Returns the float copy and the loop's figures."""
    q = copy.deepcopy(student).cpu().eval()
    hooks = attach(q, calib)
    feats = (adapter.feature_modules(teacher), adapter.feature_modules(q)) if d.feature_weight > 0 else None
    try:
        stats = distill(q, teacher, train, steps=steps, batch_size=d.batch_size, lr=d.lr * LR_SCALE,
                        weight_decay=d.weight_decay, warmup_steps=min(d.warmup_steps, steps // 10),
                        temperature=d.temperature, feature_weight=d.feature_weight if feats else 0.0,
                        label_weight=d.label_weight, features=feats, seed=d.seed + 1, device=device,
                        amp=False, workers=d.workers, checkpoint=None, checkpoint_every=None, resume=False,
                        fingerprint="", keep=None, frozen_bn=True, log=log)
    finally:
        detach(q, hooks)
    return q.eval(), stats


def _summary(ctl: dict) -> dict:
    return {"kl": ctl["kl"], "disagreement": ctl["disagreement"], "kept_float": len(ctl["kept_float"]),
            "meets": ctl["meets"]}


def _better(a: dict, b: dict, metric: str) -> bool:
    """a is better than b: within the bound, then fewer float layers (a faster file), then closer."""
    return (not a["meets"], len(a["kept_float"]), a[metric]) < (not b["meets"], len(b["kept_float"]), b[metric])


def int8_qat(ptq: dict, base: Path, path: Path, *, student, teacher, train, d, steps: int, bound: Bound,
             calib: torch.Tensor, held: torch.Tensor, ex, old=None, device=torch.device("cpu"), adapter=None,
             log=print) -> dict:
    """The int8_static record to ship: `ptq` (already written at `path`) when its plain file is within `bound`, else
    the better of it and a QAT file (quantized from `steps` steps of fake-quant distillation, scored against
    `base` = model.onnx on `held`). Either way its accuracy_control says which was used, before and after."""
    x = calib if ex.dynamic_batch else calib[:1]  # as the exporter checks a variant
    ctl = ptq["accuracy_control"]
    plain = ctl["plain_kl"] if bound.metric == "kl" else ctl["plain_disagreement"]
    if plain <= bound.value:
        ctl["qat"] = {"used": "ptq", "why": "the plain int8 file is within the bound"}
        return ptq
    if dist.is_initialized() and dist.get_world_size() > 1:  # the other ranks have left: DDP here would wait forever
        ctl["qat"] = {"used": "ptq", "why": "QAT runs in a single process; this run was started by torchrun"}
        log("export: warning: int8_static: export.int8_qat_steps skipped under torchrun (the plain file misses "
            "its bound); run compress apply in one process for QAT")
        return ptq
    t0 = time.perf_counter()
    log(f"export: int8_static: post-training quantization needed {len(ctl['kept_float'])} float layer(s) "
        f"({bound.metric} {ctl[bound.metric]:.3g}); quantization-aware fine-tune, {steps} steps")
    q, stats = finetune(student, teacher, train, d, steps, calib, device=device, adapter=adapter, log=log)
    work = Path(tempfile.mkdtemp(prefix=".qat-", dir=path.parent))
    try:
        with torch.no_grad():
            ref = student(x)  # the shipped student's logits: the QAT file must agree with them as the PTQ file did
        write_onnx(q, work / "qat.onnx", x, opset=ex.opset, dynamic_batch=ex.dynamic_batch, tol=ex.parity_tol,
                   slim=ex.slim)
        try:
            rec = write_int8(work / "qat.onnx", work / path.name, "int8_static", ref, x,
                             min_agreement=ex.int8_min_agreement, old=old, bound=bound, held=held, reference=base)
        except VerificationError as e:  # the QAT file disagrees with the student: the PTQ file ships
            rec = None
            why = str(e).split(";")[0]
        info = {"steps": steps, "lr": d.lr * LR_SCALE, "final_loss": stats["final_loss"],
                "seconds": round(time.perf_counter() - t0, 1), "before": _summary(ctl)}
        if rec is None:
            ctl["qat"] = {**info, "used": "ptq", "why": f"the QAT file failed its check: {why}"}
            return ptq
        info["after"] = _summary(rec["accuracy_control"])
        if not _better(rec["accuracy_control"], ctl, bound.metric):
            ctl["qat"] = {**info, "used": "ptq", "why": "the QAT file was not closer to model.onnx"}
            return ptq
        for name in rec["files"]:  # the QAT file replaces the PTQ one under the same name(s)
            os.replace(work / name, path.with_name(name))
        for name in set(ptq["files"]) - set(rec["files"]):
            path.with_name(name).unlink(missing_ok=True)
        rec["accuracy_control"]["qat"] = {**info, "used": f"qat {steps} steps"}
        return rec
    finally:
        shutil.rmtree(work, ignore_errors=True)
