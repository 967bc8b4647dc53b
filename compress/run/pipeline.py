"""load -> rewrite (each exact pass verified) -> export (each file verified) -> measure -> report.

Owns the teacher (the loaded model, never modified) and the staging directory that
becomes the output only when everything passed.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_model

from ..core.diskio import nbytes, writing
from ..core.errors import GateError, InputError, VerificationError, publishing
from ..core.limits import check_memory, release
from ..core.locks import scratch_dir
from ..core.modules import learned_parameters
from ..core.registry import PassContext, get_pass
from ..core.rsslog import mark
from ..core.version import __version__
from ..distill.qat import int8_qat
from ..distill.train import KeepBest, distill
from ..export import runtimes
from ..export.quant import bound_for
from ..export.write import SLIM_AUTO_MAX, write_fp16, write_int8, write_onnx, write_safetensors
from ..load.data import Unreadable, calibration_batch, chance_warning, dataset, imagenet_labels, loader, unreadable_warning
from ..load.model import load
from ..measure.accuracy import accuracy_gate, gate_basis
from ..measure.metrics import (
    count_flops,
    count_params,
    evaluate,
    fidelity,
    latency_child,
    logits,
    logits64,
    ort_predictor,
)
from ..passes.applicable import unexpected, why_not
from ..recipe import Recipe
from ..report.write import int8_control, machine_info, write_reports
from .outdir import check_inputs_untouched, claim, let_go, publish, sha256

EXACT_TOL = 1e-4  # max |Δlogit| / max |logit| allowed for a pass that declares itself exact
TEACHER_CHECK = 4  # images the teacher's measure-only ONNX file is checked on against PyTorch


class Stages:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _check_recipe_needs(recipe: Recipe, data) -> None:
    g, r = recipe.gates, recipe.report
    if (g.max_top1_drop is not None or g.min_agreement is not None) and r.eval_data is None:
        raise InputError("gates max_top1_drop/min_agreement need report.eval_data; add it or drop the gate")
    if (g.min_speedup is not None or g.max_size_ratio is not None) and "onnx" not in recipe.export.formats:
        raise InputError("gates min_speedup/max_size_ratio are measured on the ONNX file; add onnx to export.formats")
    if g.min_speedup is not None and r.latency is None:
        raise InputError("gate min_speedup needs report.latency; do not set it to null")
    if recipe.distill is not None and recipe.distill.feature_weight > 0 and any(s.name == "token_merge" for s in recipe.steps):
        raise InputError("distill.feature_weight matches block outputs token by token, and token_merge leaves fewer "
                         "tokens in the student's blocks; set distill.feature_weight: 0 with token_merge")
    if "int8_static" in recipe.export.quantize and recipe.calibration_source(data) is None:
        raise InputError("export.quantize int8_static calibrates on real images; set calibration.data or pass --data")
    recipe.check_calibration(data)
    if variants(recipe.export) and "onnx" not in recipe.export.formats:
        raise InputError("export.precision fp16 / export.quantize make ONNX variants; add onnx to export.formats")
    runtimes.fit_check(recipe.export)
    if g.variant is not None and g.variant not in variants(recipe.export):
        raise InputError(f"gates.variant {g.variant} is not exported; add it to export.precision/quantize or drop it")
    if g.speedup_batch is not None and (r.latency is None or g.speedup_batch not in r.latency.batch_sizes):
        raise InputError(f"gates.speedup_batch {g.speedup_batch} is not timed; add it to report.latency.batch_sizes")


def rewrite(loaded, recipe: Recipe, calib, log, inplace: bool = False, ref: torch.Tensor | None = None) -> tuple:
    """Apply the passes in order to a copy of the teacher (to the teacher itself when `inplace`: a caller
    that needs nothing more of it); verify exact ones, measure the rest.

    Returns the student, the per-pass ledger (FLOPs before/after each pass included) and the
    logits on `calib` of the teacher (`ref` when the caller has them) and of the student. Logits are float32 (one teacher forward, reused); an exact
    pass alone is checked in float64, before and after it, so the check measures the maths.
    """
    teacher, adapter = loaded.model, loaded.adapter
    size = loaded.data_cfg["input_size"]
    student = teacher if inplace else copy.deepcopy(teacher)
    mark("rewrite: copy teacher")
    runs = [s for s in recipe.steps if adapter.family in get_pass(s.name).families]
    if ref is None and not (runs and get_pass(runs[0].name).input_logits and not runs[0].config.is_exact()):
        ref = logits(teacher, calib)  # else the first pass's own forward gives them (ViT-L: one 8 s forward fewer)
    prev = ref
    mark("rewrite: teacher logits")
    prev64 = None  # float64 logits of the student as it is now, while still valid
    params, flops = count_params(student), count_flops(student, size)
    mark("rewrite: flops")
    ledger = []
    for i, step in enumerate(recipe.steps):
        spec = get_pass(step.name)
        msg = why_not(step.name, spec, adapter, student, loaded.source.get("note"))
        if msg:
            if not recipe.skip_inapplicable:
                raise InputError(f"{msg}; remove it from the recipe or set skip_inapplicable: true")
            log(f"skipped {step.name}: {msg}")
            ledger.append({"pass": step.name, "skipped": msg})
            continue
        exact = step.config.is_exact()
        if exact and prev64 is None:
            prev64 = logits64(student, calib)
        t0 = time.perf_counter()
        try:
            result = spec.fn(student, adapter, step.config, PassContext(calib))
        except InputError as e:
            raise InputError(f"recipe passes[{i}]: {e}") from None
        except AttributeError as e:  # a structure the pass was not written for (a block without .attn)
            raise InputError(f"recipe passes[{i}]: {unexpected(step.name, student, e)}") from None
        student = result.model.eval()
        if ref is None:  # the first pass ran the teacher's forward (PassSpec.input_logits)
            if result.input_logits is None:
                raise AssertionError(f"pass '{step.name}' is registered with input_logits but returned none")
            ref = prev = result.input_logits
        now64 = logits64(student, calib) if exact else None
        now = now64.float() if exact else (result.logits if result.logits is not None else logits(student, calib))
        p1, f1 = count_params(student), count_flops(student, size)
        entry = {"pass": step.name, "config": step.config.model_dump(mode="json"), "exact": exact,
                 "params": [params, p1], "flops": [flops, f1], "changes": result.changes, "details": result.details}
        if exact:
            check = fidelity(prev64, now64)
            entry["verified"] = {**check, "tolerance": EXACT_TOL}
            if not check["rel_diff"] <= EXACT_TOL:
                raise VerificationError(f"pass '{step.name}' is declared exact but moved the logits by {check['rel_diff']:.2e} "
                                        f"of their scale (> {EXACT_TOL:.0e}) on the calibration batch; nothing was written. "
                                        "This is a bug: please report it with the recipe")
        entry["vs_teacher"] = fidelity(ref, now)
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        ledger.append(entry)
        for line in result.changes:
            log(f"{step.name}: {line}")
        params, flops, prev, prev64 = p1, f1, now, now64
        del result
        release()  # the pass's statistics, the float64 copies, the replaced layers
        mark(f"rewrite: {step.name}")
    return student, ledger, ref, prev


def distill_data(recipe: Recipe, data: str | None, data_cfg: dict):
    """The training set, opened (and so checked) before anything is written; None without distill."""
    d = recipe.distill
    if d is None:
        return None
    path = d.data if d.data is not None else data
    if path is None:
        raise InputError("distill: no training data; set distill.data in the recipe or pass --data")
    return dataset(path, data_cfg, d.limit)


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("distill.device is cuda but no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def run_distill(recipe: Recipe, loaded, student, train, calib, ref, start, work: Path, *, resume: bool,
                device: str | None, ckpt: str, log) -> dict:
    d = recipe.distill
    steps = d.steps or (math.ceil(d.epochs * len(train) / d.batch_size) if d.epochs else 500)
    world = dist.get_world_size() if dist.is_initialized() else 1
    what = {k: v for k, v in recipe.resolved().items() if k in ("model", "passes", "distill", "calibration")}
    fingerprint = hashlib.sha256(json.dumps([what, str(Path(ckpt).resolve()), world], sort_keys=True).encode()).hexdigest()
    checkpoint = work / "distill.pt"  # written every checkpoint_every steps, and at once on SIGINT/SIGTERM
    teacher, adapter = loaded.model, loaded.adapter
    feats = (adapter.feature_modules(teacher), adapter.feature_modules(student)) if d.feature_weight > 0 else None
    before = fidelity(ref, start)
    dev = _device(device or d.device)
    keep, start_kl = None, before["kl"]
    if d.holdout_images:  # seeded training images scored for keep-best (see _holdout)
        hx = _holdout(train, d.holdout_images, d.seed)
        with torch.no_grad():
            keep = KeepBest(hx, torch.cat([teacher(c) for c in hx.split(64)]), every=max(1, steps // 15))
        start_kl = keep.measure(student, torch.device("cpu"))
    # A near-exact student only loses at a full lr: for the shared ResNet's width student at 50% (KL0 0.04) keep-best
    # returned the untrained start (77.8% top-1) at lr 5e-4; at 1e-4 (what sqrt(KL0) gives) it reached 79.4%
    lr = d.lr * (min(1.0, max(0.1, max(start_kl, 0.0) ** 0.5)) if d.lr_scale == "start_kl" else 1.0)
    frozen = d.batchnorm == "frozen" or d.batchnorm == "auto" and any(get_pass(s.name).fits_batchnorm for s in recipe.steps)
    log(f"distill: {steps} steps of {d.batch_size} images on {dev} x{world} from {_shown(train.path)}, lr {lr:.3g}"
        + (f" (= {d.lr:g} x {lr / d.lr:.3g}: starting KL {start_kl:.4g})" if d.lr_scale == "start_kl" else "")
        + (", BatchNorm statistics frozen" if frozen else ""))
    stats = distill(student, teacher, train, steps=steps, batch_size=d.batch_size, lr=lr, weight_decay=d.weight_decay,
                    warmup_steps=min(d.warmup_steps, steps), temperature=d.temperature, feature_weight=d.feature_weight,
                    label_weight=d.label_weight, features=feats, seed=d.seed, device=dev, amp=d.amp, workers=d.workers,
                    checkpoint=checkpoint, checkpoint_every=d.checkpoint_every, resume=resume,
                    fingerprint=fingerprint, keep=keep, frozen_bn=frozen, log=log)
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(work, ignore_errors=True)  # training finished: nothing left to resume
    after = fidelity(ref, logits(student, calib))
    log(f"distill: done in {stats['seconds']:.0f} s ({stats['images_per_s']:.0f} images/s), final loss "
        f"{stats['final_loss']:.4f}; calibration agreement {100 * before['agreement']:.1f}% -> {100 * after['agreement']:.1f}%")
    return {**stats, "data": str(train.path), "images": len(train), "calib_before": before, "calib_after": after,
            "lr": lr, "start_kl": start_kl, "batchnorm": "frozen" if frozen else "train"}


def _shown(path) -> str:
    """A path as the log prints it: relative to the working directory, so logs pasted into docs name no machine."""
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive (Windows)
        return str(path)


def _holdout(train, n: int, seed: int) -> torch.Tensor:
    """n seeded images of the training set (eval transform). With thousands of images and a few hundred
    steps, few of them are ever drawn for training; the set is the same for a resumed run."""
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7919))[:n]
    items = [train[int(i)] for i in idx]
    return torch.stack([it[0] for it in items if not isinstance(it, Unreadable)])


def _export(recipe: Recipe, loaded, student, staging: Path, calib, ledger: list, old, log, ref=None, held=None) -> dict:
    """Write every artifact the recipe asks for; each is verified before it gets its final name. `held`: held-out
    calibration images, on which int8_static's accuracy control scores its files (quant.bound_for)."""
    ex, artifacts, need = recipe.export, {}, nbytes(student)  # about what each full-precision file takes
    bound = bound_for(ex, recipe.gates, recipe.target)
    meta = {"compress_version": __version__, "source_arch": loaded.source["arch"],
            "source_kwargs": json.dumps(loaded.source["kwargs"]), "source_base": json.dumps(loaded.source.get("base")),
            "recipe": json.dumps(recipe.resolved()), "family": loaded.adapter.family,
            "structure": json.dumps([entry.get("details", {}) for entry in ledger])}  # what load_compressed replays
    if "safetensors" in ex.formats:
        with writing("model.safetensors", staging, need):
            artifacts["safetensors"] = write_safetensors(student, staging / "model.safetensors", meta)
        mark("export: safetensors")
        if "fp16" in ex.precision:
            with writing("model.fp16.safetensors", staging, need // 2):
                artifacts["safetensors.fp16"] = write_safetensors(copy.deepcopy(student).half(),
                                                                  staging / "model.fp16.safetensors", meta)
    if "onnx" in ex.formats:
        base = staging / "model.onnx"
        with writing("model.onnx", staging, need):
            artifacts["onnx"] = onnx_rec = write_onnx(student, base, calib, opset=ex.opset, dynamic_batch=ex.dynamic_batch,
                                                      tol=ex.parity_tol, slim=ex.slim, old=old,
                                                      external_above=int(ex.external_data_mb * 2**20), ref=ref)
        mark("export: onnx")
        if onnx_rec.get("fixed_batch"):
            log(f"export: warning: {onnx_rec['fixed_batch']}")
        elif onnx_rec.get("traced_batch_baked"):
            log(f"export: the trace baked the batch size in ({onnx_rec['traced_batch_baked']}); exported with the dynamo exporter instead")
        x = calib if onnx_rec["dynamic_batch"] else calib[:1]
        if variants(ex):  # the reference the variants are checked against (ViT-L: a 4 s forward, for none)
            with torch.no_grad():
                ref = student(x)
        for v in variants(ex):
            log(f"export: {v} variant")
            path = staging / f"model.{v}.onnx"
            big = int(ex.external_data_mb * 2**20)
            with writing(path.name, staging, need):
                artifacts[f"onnx.{v}"] = (write_fp16(base, path, ref, x, tol=ex.fp16_tol, old=old, external_above=big)
                                          if v == "fp16" else
                                          write_int8(base, path, v, ref, x, min_agreement=ex.int8_min_agreement,
                                                     convs=ex.int8_dynamic_convs, old=old, external_above=big,
                                                     bound=bound if v == "int8_static" else None, held=held))
            if "accuracy_control" in artifacts[f"onnx.{v}"]:
                log(f"export: {v}: {int8_control(artifacts[f'onnx.{v}']['accuracy_control'])}")
            if "note" in artifacts[f"onnx.{v}"]:
                log(f"export: warning: {v}: {artifacts[f'onnx.{v}']['note']}")
            release()
    return artifacts


def variants(ex) -> list[str]:
    return [p for p in ex.precision if p != "fp32"] + list(ex.quantize)


def _teacher_files(recipe: Recipe, teacher, calib, folder: Path, ref: torch.Tensor) -> dict:
    """The teacher through the same writers as the student, so sizes and latency compare like with like."""
    with writing("the teacher's temporary files (for sizes and latency)", folder, nbytes(teacher)):
        return _teacher_files_in(recipe, teacher, calib, folder, ref)


def _teacher_files_in(recipe: Recipe, teacher, calib, folder: Path, ref: torch.Tensor) -> dict:
    ex, out = recipe.export, {}
    if "safetensors" in ex.formats:  # its size only: written, not read back
        save_model(teacher, str(folder / "teacher.safetensors"))
        out["safetensors"] = {"bytes": (folder / "teacher.safetensors").stat().st_size}
        (folder / "teacher.safetensors").unlink()
        mark("measure: teacher safetensors")
    if "onnx" in ex.formats:
        timed = recipe.report.latency is not None  # else the teacher's file is only measured for its size
        # a large teacher's file is written lean (weights streamed in: torch's exporter holds ~3x them at once)
        big = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) > SLIM_AUTO_MAX
        n = TEACHER_CHECK  # a file that is timed, not shipped: checked on a few images (ViT-L: 16 cost 10 s)
        out["onnx"] = write_onnx(teacher, folder / "teacher.onnx", calib[:n], opset=ex.opset,
                                 dynamic_batch=ex.dynamic_batch, tol=ex.parity_tol, slim=ex.slim,
                                 external_above=int(ex.external_data_mb * 2**20), check=timed,
                                 ref=ref[:n] if ref is not None else None, lean=big)
        mark("measure: teacher onnx")
    return out


def _measure(recipe: Recipe, teacher, student, staging: Path, calib, cfg: dict, artifacts: dict, tfiles: dict,
             folder: Path, summary: dict, log) -> dict:
    """Sizes against the teacher's files (`tfiles`, in `folder`) and accuracy, into `summary`; returns the ONNX
    files to time (none without report.latency)."""
    ex, rep = recipe.export, recipe.report
    onnx_files = {}
    if "safetensors" in ex.formats:
        summary["safetensors_bytes"] = _ratio(tfiles["safetensors"]["bytes"], artifacts["safetensors"]["bytes"])
    if "onnx" in ex.formats:
        summary["onnx_bytes"] = _ratio(tfiles["onnx"]["bytes"], artifacts["onnx"]["bytes"])
        if rep.latency is None:
            summary["onnx_bytes"]["teacher_file"] = "plain export, size only (no latency asked: not slimmed or run)"
        summary["variant_bytes"] = {v: artifacts[f"onnx.{v}"]["bytes"] for v in variants(ex)}
        onnx_files = {"teacher": folder / "teacher.onnx", "student": staging / "model.onnx",
                      **{v: staging / f"model.{v}.onnx" for v in variants(ex)}}
    if rep.eval_data is not None:
        log(f"evaluating on {_shown(rep.eval_data)}")
        ds, dl = loader(rep.eval_data, cfg, limit=rep.eval_images)
        outputs = int(logits64(teacher, calib[:1]).shape[-1])
        mapped = imagenet_labels(ds, outputs)
        if mapped:
            log(f"labels: {mapped}")
        warn = (f"{rep.eval_data} has {len(ds.classes)} class folders but the model has {outputs} outputs; "
                "top-1 assumes folder i (sorted by name) is output i"
                if ds.labeled and len(ds.classes) != outputs and not mapped else None)
        if warn:
            log(f"warning: {warn}")
        models = {"teacher": teacher, "student": student,
                  **{v: ort_predictor(onnx_files[v], ex.dynamic_batch and artifacts["onnx"]["dynamic_batch"])
                     for v in variants(ex) if v in onnx_files}}
        ev = {"data": str(rep.eval_data), **evaluate(models, dl), **({"labels": mapped} if mapped else {})}
        low = chance_warning(ev, len(ds.classes), rep.eval_data)
        if low:
            log(f"warning: {low}")
        warn = "; ".join(w for w in (warn, low) if w)
        summary["eval"] = ev = {**ev, **({"warning": warn} if warn else {})}
        skipped = unreadable_warning("evaluation", ev["skipped"], ev.get("first_unreadable"), rep.eval_data)
        if skipped:
            log(skipped)
        mark("measure: eval")
    return onnx_files if rep.latency is not None else {}


def _latency(recipe: Recipe, onnx_files: dict, tfiles: dict, artifacts: dict, size, summary: dict, log) -> None:
    """onnxruntime latency of the teacher, the student and every variant, interleaved, in a child process."""
    lat, ex = recipe.report.latency, recipe.export
    dyn = tfiles["onnx"]["dynamic_batch"] and artifacts["onnx"]["dynamic_batch"]  # a forward may fix the batch (see write_onnx)
    log(f"timing onnxruntime: batch {lat.batch_sizes}, {lat.threads} threads, {lat.runs} interleaved runs")
    if not dyn and lat.batch_sizes != [1]:
        summary["latency_note"] = "batch 1 only: model.onnx has a fixed batch of 1 (see artifacts.onnx.fixed_batch)"
        log(f"timing: {summary['latency_note']}")
    res = latency_child(onnx_files, size, batch_sizes=lat.batch_sizes if dyn else [1],
                        threads=lat.threads, warmup=lat.warmup, runs=lat.runs)
    summary["latency"] = {bs: {"teacher": res["teacher"][bs], "student": res["student"][bs],
                               "speedup": res["teacher"][bs]["p50_ms"] / res["student"][bs]["p50_ms"],
                               "variants": {v: {**res[v][bs], "speedup": res["teacher"][bs]["p50_ms"] / res[v][bs]["p50_ms"]}
                                            for v in variants(ex)}}
                          for bs in res["student"]}
    mark("latency")


def _gates(recipe: Recipe, summary: dict) -> list[dict]:
    g = recipe.gates
    checks = []

    def add(name, target, measured, ok):
        checks.append({"gate": name, "target": target, "measured": measured, "ok": bool(ok)})

    if g.max_params_ratio is not None:
        r = summary["params"]["ratio"]
        add("max_params_ratio", g.max_params_ratio, r, r <= g.max_params_ratio)
    if g.max_flops_ratio is not None:
        r = summary["flops"]["ratio"]
        add("max_flops_ratio", g.max_flops_ratio, r, r <= g.max_flops_ratio)
    v = g.variant  # the gates read the file that ships: model.onnx, or this variant of it
    of = f" of model.{v}.onnx" if v else ""
    if g.max_size_ratio is not None:
        r = (summary["variant_bytes"][v] if v else summary["onnx_bytes"]["student"]) / summary["onnx_bytes"]["teacher"]
        add(f"max_size_ratio{of}", g.max_size_ratio, r, r <= g.max_size_ratio)
    if g.min_speedup is not None:
        bs = str(g.speedup_batch or max(int(b) for b in summary["latency"]))  # batch 1 only when model.onnx has a fixed batch
        s = summary["latency"][bs]["variants"][v]["speedup"] if v else summary["latency"][bs]["speedup"]
        add(f"min_speedup{of} (batch {bs}, p50)", g.min_speedup, s, s >= g.min_speedup)
    ev = summary.get("eval") or {}
    mine = ev.get("variants", {}).get(v, {}) if v else {"top1": ev.get("student_top1"), "agreement": ev.get("agreement")}
    if g.max_top1_drop is not None:
        if "teacher_top1" not in ev:
            raise InputError(f"gate max_top1_drop needs labels, but {ev['data']} has no class folders; drop the gate")
        checks.append(accuracy_gate(f"max_top1_drop{of} (points)", g.max_top1_drop, g.accuracy,
                                    ev["intervals"][v or "student"]["drop"]))
    if g.min_agreement is not None:
        add(f"min_agreement{of}", g.min_agreement, mine["agreement"], mine["agreement"] >= g.min_agreement)
    return checks


def _flops(ledger: list, teacher, student, size) -> tuple[int, int]:
    """Teacher and student FLOPs, from the ledger when a pass ran (counted there already)."""
    ran = [e for e in ledger if "flops" in e]
    if ran:
        return ran[0]["flops"][0], ran[-1]["flops"][1]
    return count_flops(teacher, size), count_flops(student, size)


def _ratio(a, b) -> dict:
    return {"teacher": a, "student": b, "ratio": b / a if a else None}


def apply(recipe: Recipe, ckpt: str, out: Path, *, data: str | None = None, dry_run: bool = False,
          overwrite: bool | str = False, resume: bool = False, device: str | None = None, inputs: tuple = (),
          log=print) -> dict:
    """Run a recipe. Under torchrun every rank rewrites and distills; rank 0 alone writes. `overwrite`: True
    replaces a previous compress result at `out`, "force" anything (outdir.refusal)."""
    mark("start (imports)")
    stages = Stages()
    primary = not dist.is_initialized() or dist.get_rank() == 0
    _check_recipe_needs(recipe, data)
    # the older runtime the files must also run on: installed once into the cache, or a clear failure now
    old = runtimes.for_recipe(recipe.export, log) if primary and not dry_run else None
    with stages("load"):
        loaded = load(ckpt, recipe.model)
    mark("load")
    for key in ("read", "detected", "converted", "torch_layers", "output", "note", "preprocess_note"):
        if loaded.source.get(key):
            log(f"load: {loaded.source[key]}")
    if loaded.source.get("preprocess_warning"):
        log(f"warning: {loaded.source['preprocess_warning']}")
    data_paths = [recipe.calibration.data, recipe.report.eval_data, recipe.distill and recipe.distill.data, data]
    check_inputs_untouched([*inputs, *([ckpt] if Path(ckpt).exists() else []), *[p for p in data_paths if p]], out)
    train = distill_data(recipe, data, loaded.data_cfg)  # bad data fails here, before anything is written
    held = claim(out, overwrite) if primary and not dry_run else None  # OUT's lock, held until release
    staging = held.staging if held is not None else None
    work = out.parent / f".{out.name}.work"  # resumable distillation checkpoints live here until publish
    try:
        if primary and not dry_run and not resume:
            shutil.rmtree(work, ignore_errors=True)
        if recipe.target is None:
            record = _run(recipe, loaded, staging, data, train, work, dry_run, resume, device, ckpt, old, stages, log,
                          last=True)
        else:  # plan first (compress/planner/search.py); an accuracy miss may retry the next candidate in a clean staging dir
            from ..planner.search import run_target

            def attempt(planned: Recipe, extra: dict) -> dict:
                for p in staging.iterdir() if staging is not None else ():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                return _run(planned, loaded, staging, data, train, work, dry_run, resume, device, ckpt, old, stages, log, extra)

            record = run_target(recipe, loaded, data, attempt, log)  # its seconds are in record["plan"]
        if held is not None:
            with publishing():  # from just before the rename: a signal after it cannot make a complete OUT fail
                publish(held)
            shutil.rmtree(work, ignore_errors=True)
        return record
    finally:
        if held is not None:
            let_go(held)  # a failed run's staging folder, the lock, the parents it made (if still empty)


def _run(recipe: Recipe, loaded, staging: Path | None, data, train, work: Path, dry_run: bool, resume: bool,
         device: str | None, ckpt: str, old, stages: Stages, log, extra: dict | None = None, last: bool = False) -> dict:
    """One conversion. `last`: the caller needs the loaded model no more (no planner retry): it is then freed
    before the latency child starts, and rewritten in place when nothing else reads the teacher later."""
    with scratch_dir("compress-teacher-") as tmp:  # the teacher's files, for sizes and latency; swept if killed
        return _run_in(recipe, loaded, staging, data, train, work, dry_run, resume, device, ckpt, old, stages, log,
                       extra, last, Path(tmp))


def _run_in(recipe: Recipe, loaded, staging: Path | None, data, train, work: Path, dry_run: bool, resume: bool,
            device: str | None, ckpt: str, old, stages: Stages, log, extra: dict | None, last: bool, tmp: Path) -> dict:
    teacher, cfg = loaded.model, loaded.data_cfg
    size = tuple(cfg["input_size"])
    calib_path = recipe.calibration_source(data)  # any images the run is given, unless calibration.data says otherwise
    train_batch = recipe.distill.batch_size if recipe.distill is not None and not torch.cuda.is_available() else None
    memory = check_memory(teacher, size, calib_images=recipe.calibration.images, train_batch=train_batch)
    planned = extra is not None and "plan" in extra  # the planner read (and warned about) these images already
    calib, calib_desc = calibration_batch(calib_path, cfg, recipe.calibration.images, recipe.calibration.seed,
                                          log=None if planned else log)
    mark("calibration batch")
    # Nothing reads the teacher after the rewrite (no distillation, no evaluation): its files are written first and
    # the passes then rewrite it in place (ViT-L: no second copy of 1.2 GB of weights)
    inplace = last and not dry_run and recipe.distill is None and recipe.report.eval_data is None
    tfiles, teacher_params, ref = None, count_params(teacher), None
    if inplace:  # the teacher's files before the passes consume it; its reference logits on the few images they need
        with stages("measure"):
            tfiles = _teacher_files(recipe, teacher, calib, tmp, logits(teacher, calib[:TEACHER_CHECK]))
    with stages("rewrite"):
        student, ledger, ref, rewritten = rewrite(loaded, recipe, calib, log, inplace=inplace, ref=ref)
    if inplace:  # the teacher is gone: nothing may read it by mistake
        loaded.model = teacher = None
    record = {"compress_version": __version__, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "source": loaded.source, "input_size": list(size), "calibration": calib_desc,
              **({"calibration_random": True} if calib_path is None else {}),
              "recipe": recipe.resolved(), "passes": ledger, **({"memory_estimate": memory} if memory else {}),
              **(extra or {})}
    summary = {"params": _ratio(teacher_params, count_params(student)),
               "flops": _ratio(*_flops(ledger, student if teacher is None else teacher, student, size))}  # in place: the same
    record["summary"] = summary
    if dry_run:
        record["stages_s"] = stages.seconds
        return record
    if recipe.distill is not None:
        with stages("distill"):
            record["distill"] = run_distill(recipe, loaded, student, train, calib, ref, rewritten, work, resume=resume,
                                            device=device, ckpt=ckpt, log=log)
        if staging is None:  # a torchrun rank other than 0: its share of the training is done
            return record
    learned = learned_parameters(student)
    if learned:  # values a pass left to training (e.g. attn_diffusion's gamma), as they are now
        record["learned"] = learned

    with stages("export"):
        # the student's calibration logits from the rewrite, unless training changed it since
        ex = recipe.export
        held = (calibration_batch(calib_path, cfg, recipe.calibration.images, recipe.calibration.seed, holdout=True)[0]
                if "int8_static" in ex.quantize and bound_for(ex, recipe.gates, recipe.target) else None)
        record["artifacts"] = artifacts = _export(recipe, loaded, student, staging, calib, ledger, old, log,
                                                  rewritten if recipe.distill is None else None, held=held)
        if ex.int8_qat_steps and "onnx.int8_static" in artifacts:  # PTQ missed its bound: fake-quant distillation
            artifacts["onnx.int8_static"] = a = int8_qat(
                artifacts["onnx.int8_static"], staging / "model.onnx", staging / "model.int8_static.onnx",
                student=student, teacher=teacher, train=train, d=recipe.distill, steps=ex.int8_qat_steps,
                bound=bound_for(ex, recipe.gates, recipe.target), calib=calib, held=held, ex=ex, old=old,
                device=_device(device or recipe.distill.device), adapter=loaded.adapter, log=log)
            log(f"export: int8_static: {int8_control(a['accuracy_control'])}")
        if loaded.save_back is not None:  # the original family's layout too, when the structure allows it
            with writing(f"the {loaded.source['arch']} layout", staging, nbytes(student)):
                record["family_layout"] = lay = loaded.save_back(student, staging, calib, recipe.export.parity_tol)
            log(f"export: {loaded.source['arch']} layout " + (f"not written: {lay['skipped']}" if "skipped" in lay
                                                               else f"in {lay['path']} (reloaded and compared)"))
        for a in [*artifacts.values(), record.get("family_layout") or {}]:  # `compress verify` checks these later
            if a.get("path"):
                a["sha256"] = sha256(staging / a["path"])
            if a.get("external_data"):  # model.onnx.data beside model.onnx
                a["external_data"]["sha256"] = sha256(staging / a["external_data"]["path"])
    with stages("measure"):
        tfiles = tfiles or _teacher_files(recipe, teacher, calib, tmp, ref)
        onnx_files = _measure(recipe, teacher, student, staging, calib, cfg, artifacts, tfiles, tmp, summary, log)
    if last:  # the PyTorch models are done with: freed before the timing child loads the ONNX files
        loaded.model = teacher = student = None
        release()
        mark("free models")
    if onnx_files:
        with stages("latency"):
            _latency(recipe, onnx_files, tfiles, artifacts, size, summary, log)
    if summary.get("eval", {}).get("images") == 0:
        raise InputError(f"{recipe.report.eval_data}: none of the evaluation images could be read; check the data")

    record["gates"] = _gates(recipe, summary)
    record["machine"] = machine_info(recipe.report.latency.threads if recipe.report.latency else None)
    record["stages_s"] = stages.seconds
    mark("measure: rest")
    with stages("report"), writing("report.json, report.md, report.png and recipe.yaml", staging):
        (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        write_reports(record, staging)
    record["stages_s"] = stages.seconds
    mark("report")
    failed = [g for g in record["gates"] if not g["ok"]]
    if failed:
        record["failed_gates"] = failed
        g = failed[0]
        err = GateError(f"gate {g['gate']} missed: measured {g['measured']:.4g}{gate_basis(g)}, target {g['target']}; "
                        f"nothing was published ({len(failed)} gate(s) missed)")
        err.record = record  # the CLI still shows what was measured
        raise err
    return record
