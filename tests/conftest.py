"""Shared fixtures: tiny seeded timm models saved the way users save them, and the CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each (two
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # spinning OpenMP pools on shared cores slow both several times)

import pytest
import timm
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMPRESS_SHARED", REPO.parent / "shared"))
VIT_TEACHER = SHARED / "data" / "models" / "vit_cifar10"
RESNET_TEACHER = SHARED / "data" / "models" / "resnet26_cifar10"
CIFAR_TEST = SHARED / "data" / "cifar10" / "test.zip"
CIFAR_TRAIN = SHARED / "data" / "cifar10" / "train.zip"


def need_shared(path: Path) -> Path:
    """The shared data is part of CI's contract: missing there is a failure, elsewhere a skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing; CI runs with ../shared beside the clone")
        pytest.skip(f"{path} not available")
    return path


def tiny_vit_args(heads: int = 3, qkv_bias: bool = True, depth: int = 2) -> dict:
    return {"img_size": 16, "patch_size": 8, "embed_dim": 8 * heads, "depth": depth, "num_heads": heads,
            "mlp_ratio": 2.0, "qkv_bias": qkv_bias, "num_classes": 5}


def tiny_vit(seed: int = 0, **kw) -> torch.nn.Module:
    """A seeded timm ViT small enough for unit tests.

    timm's init (std 0.02, zero biases) gives near-uniform attention and input-independent
    logits, which would make any exactness test vacuous; use fan-in scaled weights and random
    biases instead, so attention is peaked and every bias path is exercised.
    """
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **tiny_vit_args(**kw))
    return spread_weights(m)


def spread_weights(m: torch.nn.Module) -> torch.nn.Module:
    """Fan-in scaled weights and random biases (see tiny_vit): peaked attention, every bias path exercised."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
            elif name != "head.bias":
                p.normal_(0, 0.5)
    return m.eval()


def random_bn_stats(model: torch.nn.Module) -> torch.nn.Module:
    """Trained-looking BatchNorm statistics (mean ~ N(0, 0.2), var ~ U(0.5, 1.5)): with init's 0 and 1 a BN
    fold or a BN-aware equivalence check would be vacuous."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)
    return model


def save_timm_dir(model: torch.nn.Module, arch: str, model_args: dict, folder: Path) -> Path:
    """A timm-style directory: config.json (architecture, num_classes, model_args) + model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    args = {k: v for k, v in model_args.items() if k != "num_classes"}
    cfg = {"architecture": arch, "num_classes": model_args.get("num_classes"), "model_args": args}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def vit_dir(tmp_path) -> Path:
    """A 3-head tiny ViT as a timm directory."""
    return save_timm_dir(tiny_vit(heads=3), "vit_tiny_patch16_224", tiny_vit_args(heads=3), tmp_path / "vit")


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


FAST = "report: {latency: {batch_sizes: [1, 2], threads: 1, warmup: 1, runs: 3}}\n"


def run_cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a child process (exit codes and stderr as users see them),
    forked from one that has imported compress already (tests/forkcli.py); env: the whole environment."""
    from tests import forkcli

    return forkcli.run(list(args), cwd or REPO, env)


def make_image_zip(path: Path, classes: int = 3, per_class: int = 16, size: int = 16, corrupt: int = 1, seed: int = 0) -> Path:
    """A small ImageFolder zip of random PNGs (+ `corrupt` files that are not images) for data tests."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as z:
        for c in range(classes):
            for i in range(per_class):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                z.writestr(f"data/class{c}/{i:03d}.png", buf.getvalue())
        for i in range(corrupt):
            z.writestr(f"data/class0/broken{i}.png", b"\x89PNG not really an image")
    return path


@pytest.fixture
def image_zip(tmp_path) -> Path:
    return make_image_zip(tmp_path / "images.zip")
