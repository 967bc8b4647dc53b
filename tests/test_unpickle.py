"""Checkpoints with a training run's objects beside the weights load without running any of their code."""
from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import os
import pathlib

import numpy as np
import pytest
import torch

import user_models
from compress.load import checkpoint
from compress.core.errors import InputError
from test_checkpoints import convert, jitter

SIDE_EFFECT = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "compress-unpickle-ran"


class Mode(enum.Enum):
    TRAIN = "train"
    FINETUNE = "finetune"


@dataclasses.dataclass
class TrainConfig:
    lr: float = 0.1
    mode: Mode = Mode.TRAIN
    milestones: tuple = (30, 60)


class Loud:
    """A class whose unpickling would run code (its __setstate__ writes a file): it must stay a placeholder."""

    def __init__(self):
        self.path = str(SIDE_EFFECT)

    def __setstate__(self, state):
        pathlib.Path(state["path"]).write_text("ran")


class Exec:
    def __reduce__(self):
        return (os.system, (f"touch {SIDE_EFFECT}",))


def test_run_objects_beside_the_weights_become_named_placeholders(tmp_path):
    SIDE_EFFECT.unlink(missing_ok=True)
    m = jitter(user_models.resnet())
    ckpt = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(arch="resnet", lr=0.1, data=pathlib.PurePosixPath("/data/cifar"))
    meters = collections.defaultdict(list, {"loss": [2.3, 1.9]})
    torch.save({"epoch": 7, "args": args, "meters": meters, "config": TrainConfig(), "mode": Mode.FINETUNE, "best_acc": np.float32(91.5),
                "hist": np.arange(4), "hook": Loud(), "state_dict": m.state_dict()}, ckpt)
    sd, info = checkpoint.read(ckpt)
    assert set(sd) == set(m.state_dict()) and info["container"] == "'state_dict'"
    assert info["placeholders"] == ["test_unpickle.Loud", "test_unpickle.Mode", "test_unpickle.TrainConfig"]
    assert not SIDE_EFFECT.exists()  # Loud.__setstate__ never ran
    assert "kept as inert placeholders, not constructed (test_unpickle.Loud" in checkpoint.describe(info)
    rep = convert(tmp_path, ckpt, {"arch": "user_models:resnet", "img_size": 32}, m, (3, 32, 32))
    assert rep["source"]["checkpoint"]["placeholders"] == info["placeholders"]


def test_plain_namespace_needs_no_placeholder(tmp_path):
    m = jitter(user_models.resnet())
    ckpt = tmp_path / "ns.pt"
    torch.save({"args": argparse.Namespace(epochs=3), "model": m.state_dict()}, ckpt, _use_new_zipfile_serialization=False)
    sd, info = checkpoint.read(ckpt)
    assert set(sd) == set(m.state_dict()) and "placeholders" not in info and info["format"] == "torch-legacy"


@pytest.mark.parametrize("payload", ["module", "exec", "function"])
def test_code_and_modules_stay_refused(tmp_path, payload):
    SIDE_EFFECT.unlink(missing_ok=True)
    ckpt = tmp_path / "bad.pt"
    obj = {"module": user_models.resnet(), "exec": {"w": torch.ones(2), "x": Exec()},
           "function": {"w": torch.ones(2), "f": print}}[payload]
    torch.save(obj, ckpt)
    with pytest.raises(InputError, match=r"refusing to load .*pickled Python objects beyond tensors, which could run code "
                                         r"\(it references (user_models\.TinyResNet|torch\.nn\.\S+|posix\.system|(__)?builtins?(__)?\.print)\)"):
        checkpoint.read(ckpt)
    assert not SIDE_EFFECT.exists()


def test_half_precision_checkpoint_is_computed_in_float32(tmp_path):
    m = jitter(user_models.resnet())
    ckpt = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}, ckpt)
    sd, info = checkpoint.read(ckpt)
    assert info["dtype"] == {"saved": "float16", "computed": "float32"}
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    assert "note: saved in float16, loaded and computed in float32" in checkpoint.describe(info)
