"""Knowledge distillation: the original model teaches the rewritten one.

Loss = T^2 * KL(teacher || student) on logits [+ w_f * MSE of block outputs] [+ w_l * CE on labels].
Data order and augmentation are a pure function of (seed, step), so a resumed run, or the
same global batch split over DDP ranks, sees exactly the samples an uninterrupted single
process would.
"""
from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.diskio import writing
from ..core.errors import InputError, Terminated
from ..core.progress import progress
from ..load.data import Augmented, ImageFolderData, collate, unreadable_warning, worker_death


class StepBatches(torch.utils.data.Sampler):
    """Yields, for steps [start, steps), this rank's share of the global batch as (index, aug key) pairs.

    Global sample positions run through successive seeded permutations (one per epoch).
    """

    def __init__(self, n: int, batch: int, seed: int, start: int, steps: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.seed, self.start, self.steps = n, batch, seed, start, steps
        self.rank, self.per = rank, batch // world
        self._perms: dict[int, torch.Tensor] = {}

    def _index(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))}
        return int(self._perms[epoch][pos % self.n])

    def __len__(self) -> int:
        return self.steps - self.start

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = step * self.batch + self.rank * self.per
            yield [(self._index(p), (self.seed * 1_000_003 + p) % 2**63) for p in range(first, first + self.per)]


def kd_loss(student_logits, teacher_logits, temperature: float, reduction: str = "mean"):
    """T^2 * KL(teacher || student) at temperature T, per sample or averaged."""
    t = temperature
    per = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                   log_target=True, reduction="none").sum(-1) * t * t
    return per.mean() if reduction == "mean" else per


def _schedule(warmup: int, steps: int):
    """Linear warm-up, then cosine to zero."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return f


class KeepBest:
    """KL to the teacher on held-out images, checked every `every` steps from step 0; the best weights win.

    A near-exact student (KL ~ 0 at the start) can only lose at a fixed lr: measured on the ViT, 150
    steps took a whitened low-rank student from 93.8% to 90.6% agreement. Keeping the best checkpoint
    (the start included) means distillation never returns a student farther from the teacher than it got.
    """

    def __init__(self, x: torch.Tensor, teacher_logits: torch.Tensor, every: int):
        self.x, self.ref, self.every = x, teacher_logits.double().log_softmax(-1), every
        self.best_kl, self.best_step, self.best, self.history = float("inf"), None, None, []

    @torch.no_grad()
    def measure(self, student: nn.Module, device: torch.device) -> float:
        """The student's KL to the teacher on the held-out images, in eval mode; each module's mode is restored."""
        was = {m: m.training for m in student.modules()}  # frozen BatchNorm layers stay frozen afterwards
        student.eval()
        out = torch.cat([student(c.to(device)).float().cpu() for c in self.x.split(64)]).double().log_softmax(-1)
        for m, mode in was.items():
            m.training = mode
        return float(F.kl_div(out, self.ref, log_target=True, reduction="batchmean"))

    def check(self, student: nn.Module, step: int, device: torch.device) -> None:
        kl = self.measure(student, device)
        self.history.append([step, kl])
        if kl < self.best_kl:
            self.best_kl, self.best_step = kl, step
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}

    def state(self) -> dict:
        return {"best_kl": self.best_kl, "best_step": self.best_step, "best": self.best, "history": self.history}

    def load(self, state: dict) -> None:
        self.best_kl, self.best_step, self.best, self.history = (state["best_kl"], state["best_step"], state["best"],
                                                                 list(state["history"]))


def _capture(modules: list[nn.Module], store: list):
    return [m.register_forward_hook(lambda _m, _i, out: store.append(out)) for m in modules]


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with writing(f"the distillation checkpoint {path.name}", path.parent, temps=[tmp]):
        path.parent.mkdir(exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)  # a kill leaves the previous checkpoint or the new one, never half of one


class StopRequests:
    """SIGINT/SIGTERM during training stop the loop at the next step boundary (so a checkpoint of a
    whole step can be saved) instead of wherever the signal lands; a second signal stops at once."""

    def __init__(self):
        self.signum, self.old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.raise_()
        self.signum = signum

    def raise_(self):
        raise Terminated() if self.signum == signal.SIGTERM else KeyboardInterrupt()

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def _forget_workers(batches) -> None:
    """Take the DataLoader's worker pids off PyTorch's SIGCHLD watch: while registered, a dead worker's RuntimeError is
    raised again wherever the run is (inside its one-line error, or the cleanup after it)."""
    if getattr(batches, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False


def _close_loader(batches, failing: bool) -> None:
    """Stop the DataLoader's workers now, not when the iterator is collected. Shutting down beside a killed worker can
    raise ConnectionResetError/EOFError; while a run is already failing they are consequences, not news."""
    if failing:
        _forget_workers(batches)
    try:
        getattr(batches, "_shutdown_workers", lambda: None)()
    except (RuntimeError, OSError, EOFError):
        if not failing:
            raise
    finally:
        _forget_workers(batches)


def _worker_died(e: BaseException, batches) -> str | None:
    """worker_death, with the SIGCHLD watch off first (a second raise of the same death, mid-diagnosis, is caught)."""
    try:
        _forget_workers(batches)
    except RuntimeError as again:
        e = again
    return worker_death(e, batches)


def distill(student: nn.Module, teacher: nn.Module, data: ImageFolderData, *, steps: int, batch_size: int,
            lr: float, weight_decay: float, warmup_steps: int, temperature: float, feature_weight: float,
            label_weight: float, features: tuple[list, list] | None, seed: int, device: torch.device,
            amp: bool, workers: int, checkpoint: Path | None, checkpoint_every: int | None, resume: bool,
            fingerprint: str, keep: KeepBest | None = None, frozen_bn: bool = False, log=print) -> dict:
    """Train `student` in place; returns the figures for the report (loss per step included)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise InputError(f"distill.batch_size {batch_size} must divide evenly over {world} processes")
    if label_weight > 0 and not data.labeled:
        raise InputError(f"distill.label_weight > 0 needs labels, but {data.path} has no class folders; set it to 0")
    torch.manual_seed(seed)
    student.to(device).train()
    if frozen_bn:  # normalise by the running statistics, as in eval mode; the affine weights still train
        for m in student.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    teacher.to(device).eval().requires_grad_(False)
    if device.type == "cuda":  # NHWC convolutions are faster on tensor cores; a no-op for ViT blocks
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    model = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(warmup_steps, steps))
    start, history, skipped, first_bad = 0, [], 0, None
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise InputError("--resume: no distillation checkpoint to resume from; run without --resume")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise InputError("--resume: the checkpoint was made by a different recipe, checkpoint or world size; "
                             "run without --resume to start over")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, history, skipped = state["step"], list(state["history"]), state["skipped"]
        first_bad = state.get("first_unreadable")
        if keep is not None and state.get("keep") is not None:
            keep.load(state["keep"])
        log(f"distill: resuming from step {start} of {steps}")

    sampler = StepBatches(len(data), batch_size, seed, start, steps, rank, world)
    dl = torch.utils.data.DataLoader(Augmented(data), batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                     pin_memory=device.type == "cuda")
    batches = iter(dl)  # draws a worker seed from the global RNG: restore the RNG after it, as it was saved
    if resume:
        torch.set_rng_state(state["rng"])
    t_feats, s_feats = [], []
    hooks = _capture(features[0], t_feats) + _capture(features[1], s_feats) if feature_weight > 0 else []
    use_amp = amp and device.type == "cuda"
    bar = progress(steps, start, "distill", disable=rank != 0, file=sys.stderr)
    t0, images = time.perf_counter(), 0
    if keep is not None and start == 0:  # the start competes too
        keep.check(student, 0, device)

    def save(done):
        _save(checkpoint, {"fingerprint": fingerprint, "step": done, "student": student.state_dict(),
                           "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                           "rng": torch.get_rng_state(), "history": history, "skipped": skipped,
                           "first_unreadable": first_bad,
                           "keep": keep.state() if keep is not None else None})

    def stopped():
        log(f"distill: stopped at step {done} of {steps}" + (f"; resume checkpoint in {checkpoint}"
                                                             if checkpoint is not None else ""))
        stop.raise_()

    stop = StopRequests().__enter__()  # left in `finally`, with the bar and the hooks
    done = start
    try:
        for step, (x, y, bad) in zip(range(start, steps), batches):
            skipped += len(bad)
            first_bad = first_bad or (bad[0] if bad else None)
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            t_feats.clear()
            s_feats.clear()
            count = torch.tensor(float(len(x)), device=device)
            if world > 1:  # ranks may hold different numbers of readable images: weight by the global count
                dist.all_reduce(count)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = model(x)
                per = kd_loss(s_logits.float(), t_logits.float(), temperature, reduction="none")
                if feature_weight > 0:
                    per = per + feature_weight * sum((s.float() - t.float()).pow(2).flatten(1).mean(1)
                                                     for s, t in zip(s_feats, t_feats)) / len(s_feats)
                if label_weight > 0:
                    per = per + label_weight * F.cross_entropy(s_logits.float(), y, reduction="none")
                # DDP averages gradients over ranks, so scale by world: the result is the global-batch mean
                loss = per.sum() * world / count
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.detach() / world
            if world > 1:
                dist.all_reduce(value)
            history.append(float(value))
            images += len(x) * world
            bar.set_postfix(loss=f"{history[-1]:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}",  # before update: the line
                            img_s=f"{images / (time.perf_counter() - t0):.0f}", refresh=False)  # it prints is this step's
            bar.update(1)
            done = step + 1
            if keep is not None and (done % keep.every == 0 or done == steps):
                keep.check(student, done, device)
            if rank == 0 and checkpoint is not None and (stop.signum is not None or (
                    checkpoint_every and done % checkpoint_every == 0 and done < steps)):
                save(done)  # on a stop request at once: a scheduler's SIGTERM loses no finished step
            if stop.signum is not None:
                stopped()
    except (RuntimeError, ConnectionResetError, EOFError) as e:  # a worker killed (OOM killer, the job's stop)
        died = _worker_died(e, batches)
        if died is None:
            raise
        if rank == 0 and checkpoint is not None:  # (the loader is closed in `finally`, its pids already forgotten)
            save(done)  # between steps: the state is whole
        if stop.signum is None and ("Terminated" in died or "Interrupt" in died):  # the job's stop reached a worker first
            stop.signum = signal.SIGTERM if "Terminated" in died else signal.SIGINT
        if stop.signum is not None:  # a stop, as above: the steps done are kept
            stopped()
        where = f"; rerun the same command with --resume to continue from step {done}" if checkpoint is not None else ""
        raise InputError(f"a data-loading worker {died} during distillation step {done + 1} of {steps}"
                         f"{' (out of memory?)' if 'Killed' in died or 'unexpectedly' in died else ''}: lower "
                         f"distill.workers (now {workers}) or distill.batch_size (now {batch_size}){where}") from None
    finally:
        _close_loader(batches, failing=sys.exc_info()[0] is not None)
        stop.__exit__()
        bar.close()
        for h in hooks:
            h.remove()
    seconds = time.perf_counter() - t0
    warn = unreadable_warning("distill", skipped, first_bad, data.path) if rank == 0 else None
    if warn:  # the count is in report.json too; the terminal says it, with a name to look at
        log(warn)
    student.eval().to("cpu", memory_format=torch.contiguous_format)
    kept = None
    if keep is not None:
        kept = {"best_step": keep.best_step, "best_kl": keep.best_kl, "kl_history": keep.history}
        if keep.best is not None and keep.best_step != steps:  # an earlier checkpoint (or the start) was closer
            student.load_state_dict(keep.best)
            log(f"distill: kept the step-{keep.best_step} weights (held-out KL {keep.best_kl:.4g}; "
                f"final step {keep.history[-1][1]:.4g})")
    teacher.to("cpu", memory_format=torch.contiguous_format)
    tail = history[-max(1, min(20, len(history) // 10)):] if history else [float("nan")]
    return {"steps": steps, "resumed_from": start, "batch_size": batch_size, "world_size": world, "device": str(device),
            "amp_bf16": use_amp, "seconds": round(seconds, 2), "images_per_s": images / seconds if seconds else None,
            "final_loss": sum(tail) / len(tail), "skipped_images": skipped,
            **({"first_unreadable": first_bad} if first_bad else {}), "loss_history": history, "keep_best": kept}
