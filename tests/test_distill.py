"""Distillation: deterministic batches, a real kill + --resume, DDP over 2 gloo processes, report and gates."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from compress.load.data import ImageFolderData, Unreadable
from compress.distill.train import StepBatches, kd_loss
from compress.load.model import load_compressed
from tests.conftest import REPO, run_cli, write_recipe

STRIP = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n"
NO_LATENCY = "report: {latency: null}\n"


def _distill(data, steps, *, batch=8, every="null", workers=0, extra=""):
    return (STRIP + f"distill: {{data: {data}, steps: {steps}, batch_size: {batch}, lr: 2.0e-3, warmup_steps: 2, "
            f"checkpoint_every: {every}, workers: {workers}, device: cpu{extra}}}\n" + NO_LATENCY)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_step_batches_split_and_resume_consistently():
    full = list(StepBatches(n=10, batch=4, seed=3, start=0, steps=7))
    assert all(len(b) == 4 for b in full)
    first_epoch = [i for b in full for i, _ in b][:10]
    assert sorted(first_epoch) == list(range(10))  # one permutation per epoch: every image once
    assert list(StepBatches(10, 4, 3, start=4, steps=7)) == full[4:]  # resume sees the same batches
    ranks = [list(StepBatches(10, 4, 3, 0, 7, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == full  # two ranks split the same global batch
    assert list(StepBatches(10, 4, 4, 0, 7)) != full  # the seed matters


def test_kd_loss_is_zero_only_for_identical_logits():
    t = torch.randn(5, 7)
    assert float(kd_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(t + torch.randn(5, 7), t, 2.0)) > 1e-3


def test_image_folder_counts_corrupt_and_labels(image_zip):
    ds = ImageFolderData(image_zip, lambda im: torch.zeros(1))
    assert ds.classes == ["class0", "class1", "class2"] and ds.labeled and len(ds) == 49
    assert [str(ds[i]) for i in range(len(ds)) if isinstance(ds[i], Unreadable)] == ["data/class0/broken0.png"]


def test_distill_improves_fidelity_and_reports(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, 40, extra=", label_weight: 0.1, feature_weight: 0.5")
                          .replace(NO_LATENCY, f"report: {{latency: null, eval_data: {image_zip}}}\n"))
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out", env={**os.environ, "COMPRESS_PROGRESS_S": "0"})
    assert res.returncode == 0, res.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    d = rep["distill"]
    assert d["steps"] == 40 and len(d["loss_history"]) == 40 and d["resumed_from"] == 0
    # a line a step (progress every 0 s), each once, each with that step's own loss (the last was printed twice)
    steps = [line for line in res.stderr.splitlines() if line.startswith("distill: step ")]
    assert [int(line.split()[2].split("/")[0]) for line in steps] == list(range(1, 41)), res.stderr
    assert [line.split("loss ")[1].split(",")[0] for line in steps] == [f"{v:.4f}" for v in d["loss_history"]]
    # the unreadable image is named on the terminal, not only counted in report.json
    warned = [line for line in res.stdout.splitlines() if line.startswith("warning: ")]
    assert any(line.startswith(f"warning: distill: {d['skipped_images']} unreadable image")
               and "(first: data/class0/broken0.png)" in line for line in warned), res.stdout
    assert any(line.startswith("warning: evaluation: 1 unreadable image in ")
               and "(first: data/class0/broken0.png)" in line for line in warned), res.stdout
    assert d["calib_after"]["kl"] < d["calib_before"]["kl"]
    assert d["lr"] == pytest.approx(2.0e-3 * min(1.0, max(0.1, d["start_kl"] ** 0.5)))  # lr_scale: start_kl (default)
    assert d["start_kl"] > 0 and d["batchnorm"] == "train"  # a ViT: nothing to freeze
    assert d["skipped_images"] >= 1  # the corrupt file was drawn, skipped and counted, not fatal
    assert d["images_per_s"] > 0 and d["device"] == "cpu"
    assert rep["summary"]["eval"]["images"] == 48 and rep["summary"]["eval"]["skipped"] == 1
    assert "## Distillation" in (tmp_path / "out" / "report.md").read_text()
    assert not list(tmp_path.glob(".out.work*"))  # finished: no checkpoint left behind


def test_unreadable_calibration_images_are_named_on_the_terminal(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", STRIP + f"calibration: {{data: {image_zip}, images: 64}}\n"
                          "export: {formats: [safetensors]}\n" + NO_LATENCY)
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stdout.splitlines() if line.startswith("warning: calibration:")]
    assert warned == [f"warning: calibration: 1 unreadable image in {image_zip} skipped (first: data/class0/broken0.png); "
                      "remove or re-encode them"], res.stdout
    assert "1 unreadable skipped" in json.loads((tmp_path / "out" / "report.json").read_text())["calibration"]


def test_distill_gates_fail_cleanly(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, 3).replace(
        NO_LATENCY, f"report: {{latency: null, eval_data: {image_zip}}}\ngates: {{max_top1_drop: -50}}\n"))
    res = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "out")
    assert res.returncode == 4
    assert "error: gate max_top1_drop (points) missed" in res.stderr
    assert not (tmp_path / "out").exists()


def test_kill_then_resume_equals_uninterrupted(tmp_path, vit_dir, image_zip):
    """A real SIGKILL mid-distillation; --resume must end with the same weights as a clean run."""
    steps = 120  # killed at its first checkpoint (step 10): room to spare
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, steps, batch=16, every=10))
    clean = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr

    out = tmp_path / "out"
    ckpt = tmp_path / ".out.work" / "distill.pt"
    proc = subprocess.Popen([sys.executable, "-m", "compress", "apply", str(recipe), str(vit_dir), "-o", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < steps
    assert not out.exists()  # a killed run publishes nothing

    bad = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "elsewhere", "--resume")
    assert bad.returncode == 2 and "no distillation checkpoint" in bad.stderr

    res = run_cli("apply", recipe, vit_dir, "-o", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert "resuming from step" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["distill"]["resumed_from"] >= step
    a, b = _weights(tmp_path / "clean"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    clean_loss = json.loads((tmp_path / "clean" / "report.json").read_text())["distill"]["loss_history"]
    assert rep["distill"]["loss_history"] == clean_loss
    assert not list(tmp_path.glob(".out.tmp-*")) and not (tmp_path / ".out.work").exists()


def test_ddp_two_gloo_processes_match_one_process(tmp_path, vit_dir, image_zip):
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, 6, batch=8, workers=1))
    single = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "one")
    assert single.returncode == 0, single.stderr
    # two "nodes" of one process each, joined by the c10d rendezvous: the multi-node command of the README
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t",
                               "-m", "compress", "apply", str(recipe), str(vit_dir), "-o", str(tmp_path / "two")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())["distill"]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["distill"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(two["loss_history"]) == 6
    torch.testing.assert_close(torch.tensor(two["loss_history"]), torch.tensor(one["loss_history"]), rtol=1e-4, atol=1e-6)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in a:
        if k.endswith("attn.score.k.bias"):
            # the key bias cancels in the softmax: its gradient is rounding noise, which Adam's
            # normalisation amplifies to +-lr per step, so it differs without changing the function
            continue
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5, msg=k)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "two")(x), load_compressed(tmp_path / "one")(x),
                                   rtol=1e-4, atol=1e-5)


def test_sigterm_saves_at_once_publishes_nothing_and_resume_equals_uninterrupted(tmp_path, vit_dir, image_zip):
    """SIGTERM (a scheduler's stop) mid-distillation, with no periodic checkpoints: exit 143, a checkpoint
    of the step reached, nothing published; --resume ends with the clean run's weights."""
    steps = 120  # stopped at its first progress line (0.2 s of training): room to spare
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, steps, batch=16, every="null"))
    clean = run_cli("apply", recipe, vit_dir, "-o", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr

    out, ckpt = tmp_path / "out", tmp_path / ".out.work" / "distill.pt"
    env = {**os.environ, "COMPRESS_PROGRESS_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "apply", str(recipe), str(vit_dir), "-o", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:  # not a TTY: plain progress lines; stop at the first one (training is under way)
        lines.append(line)
        if line.startswith("distill: step "):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    proc.wait()
    assert proc.returncode == 143, "".join(lines) + rest
    assert "error: terminated; nothing was published" in rest
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # no output, no staging left
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < steps  # saved at once although checkpoint_every is null

    res = run_cli("apply", recipe, vit_dir, "-o", out, "--resume")
    assert res.returncode == 0, res.stderr
    rep = json.loads((out / "report.json").read_text())
    assert rep["distill"]["resumed_from"] == step
    a, b = _weights(tmp_path / "clean"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert not (tmp_path / ".out.work").exists()


@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_batchnorm_keeps_running_statistics_and_trains_the_weights(tmp_path, image_zip, frozen):
    """width fits a refit conv's constant into its BatchNorm's running mean: frozen, training must not re-estimate it."""
    from timm.models.resnet import BasicBlock, ResNet

    from compress.load.data import dataset
    from compress.distill.train import distill
    from tests.conftest import random_bn_stats

    torch.manual_seed(0)
    teacher = random_bn_stats(ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4).eval())
    student = random_bn_stats(ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4).eval())
    bn = student.layer1[0].bn1
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    distill(student, teacher, dataset(image_zip, {"input_size": (3, 32, 32)}), steps=3, batch_size=4, lr=1e-2,
            weight_decay=0.0, warmup_steps=1, temperature=2.0, feature_weight=0.0, label_weight=0.0, features=None,
            seed=0, device=torch.device("cpu"), amp=False, workers=0, checkpoint=None, checkpoint_every=None,
            resume=False, fingerprint="t", frozen_bn=frozen, log=lambda _m: None)
    assert not torch.equal(bn.weight, before["weight"])  # the affine weights train either way
    same = torch.equal(bn.running_mean, before["running_mean"]) and torch.equal(bn.running_var, before["running_var"])
    assert same == frozen


def _start_and_wait_for_training(recipe, vit_dir, out):
    """`compress apply` in its own process group, returned once its first distillation progress line is out."""
    env = {**os.environ, "COMPRESS_PROGRESS_S": "0.2"}
    proc = subprocess.Popen([sys.executable, "-m", "compress", "apply", str(recipe), str(vit_dir), "-o", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("distill: step "):
            return proc, lines
    proc.wait()
    raise AssertionError("".join(lines))


def _workers(pid: int) -> list[int]:
    """The DataLoader worker processes of `pid` (its children that are python)."""
    kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
    return [int(k) for k in kids]


def test_sigterm_to_the_whole_group_with_workers_stops_cleanly_and_resumes(tmp_path, vit_dir, image_zip):
    """Slurm (and a terminal's Ctrl-C) signal every process of the job, DataLoader workers included. A worker that
    died of it first ended the run as `internal error: DataLoader worker ... killed by signal: Terminated` (exit 1);
    the workers now leave the stop to the main process: exit 143 and a checkpoint, then --resume finishes."""
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, 80, batch=16, workers=2))
    out = tmp_path / "out"
    proc, lines = _start_and_wait_for_training(recipe, vit_dir, out)
    assert _workers(proc.pid), "the run was meant to have DataLoader workers"
    os.killpg(proc.pid, signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait()
    assert proc.returncode == 143, "".join(lines) + rest
    assert "internal error" not in rest and "error: terminated; nothing was published" in rest
    assert 0 < torch.load(tmp_path / ".out.work" / "distill.pt", weights_only=True)["step"] < 80
    res = run_cli("apply", recipe, vit_dir, "-o", out, "--resume")
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "report.json").read_text())["distill"]["resumed_from"] > 0


def test_a_worker_killed_alone_is_one_line_with_the_fix_and_resume_finishes(tmp_path, vit_dir, image_zip):
    """The OOM killer takes a DataLoader worker: one line (exit 2) naming the signal, the settings to lower and the
    --resume that continues from the steps done (saved at once), not an internal error."""
    recipe = write_recipe(tmp_path / "r.yaml", _distill(image_zip, 80, batch=16, workers=2))
    out = tmp_path / "out"
    proc, lines = _start_and_wait_for_training(recipe, vit_dir, out)
    os.kill(_workers(proc.pid)[0], signal.SIGKILL)
    rest = proc.stderr.read()
    proc.wait()
    errors = [s for s in rest.splitlines() if s.startswith("error:")]
    assert proc.returncode == 2, "".join(lines) + rest
    assert len(errors) == 1 and "a data-loading worker" in errors[0] and "distill.workers (now 2)" in errors[0]
    assert "--resume" in errors[0] and not out.exists()
    res = run_cli("apply", recipe, vit_dir, "-o", out, "--resume")
    assert res.returncode == 0, res.stderr
