"""Any Hugging Face image classifier (BEiT, DINOv2, ViT-MSN, Swin, ConvNeXt, ...) as transformers builds it.

No rename into a timm form exists for these, so the model is taken as transformers loads it (in
float32, whatever dtype it was saved in), reduced to its logits, and stands on the floor every
nn.Module has: export, distillation, every ONNX variant, verify, report and load_compressed. Passes
that rewrite a family's blocks say they do not apply. `base` records the class and its config, so
load_compressed rebuilds the same structure from transformers without the original directory.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...adapters.user import UserAdapter
from ...core.errors import InputError
from .common import Converted, LogitsOnly


def transformers():
    try:
        import transformers as tf
    except ImportError:
        raise InputError("reading a Hugging Face checkpoint needs the transformers package; pip install 'transformers>=4.40'") from None
    tf.utils.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


def from_pretrained(arch: str, folder: Path) -> torch.nn.Module:
    """`arch` from `folder` in float32, as we compute, whatever dtype it was saved in (transformers 5 keeps the saved
    dtype by default, and calls the argument `dtype`; 4.x `torch_dtype`)."""
    tf = transformers()
    key = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return getattr(tf, arch).from_pretrained(str(folder), **{key: torch.float32}).float().eval()


def classes() -> dict[str, str]:
    """model_type -> the transformers class that AutoModelForImageClassification picks for it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return dict(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def _cls(tf, arch: str):
    cls = getattr(tf, arch, None)
    if cls is None:
        raise InputError(f"Hugging Face {arch}: this transformers ({tf.__version__}) has no such class; upgrade transformers")
    return cls


def _floor(model: nn.Module, input_size, arch: str) -> tuple[nn.Module, UserAdapter]:
    kinds = sorted({type(m).__name__ for m in model.modules()})
    adapter = UserAdapter("other", [], [], input_size, None)
    adapter.module_types = kinds
    return LogitsOnly(model, "transformers output with 'logits'").eval(), adapter


def _side(config: dict) -> int:
    size = config.get("image_size", 224)
    return size[0] if isinstance(size, (list, tuple)) else int(size)


def read(folder: Path, config: dict, arch: str, pcfg: dict) -> Converted:
    """The directory as transformers loads it, in float32."""

    _cls(transformers(), arch)
    try:
        model = from_pretrained(arch, folder)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise InputError(f"{folder}: transformers could not load it as {arch} ({str(e).strip().splitlines()[0][:200]}); "
                         "check that the directory is complete") from None
    size = (config.get("num_channels", 3), _side(config), _side(config))
    pcfg = {**pcfg, "input_size": pcfg.get("input_size") or size}
    model, adapter = _floor(model, pcfg["input_size"], arch)
    note = (f"Hugging Face {arch} has no conversion to a known family (module types: {', '.join(adapter.module_types[:10])}); "
            "it loads, exports and distills as transformers builds it, but passes that rewrite blocks cannot run on it")
    base = {"builder": "hf", "arch": arch, "config": config, "input_size": list(pcfg["input_size"])}
    source = {"read_as": f"hf:{arch}", "converted": f"taken as transformers {arch} builds it (float32), logits only",
              "note": note}
    return Converted(model, base, source, pcfg, None, adapter)


def rebuild(base: dict) -> tuple[nn.Module, UserAdapter]:
    """The same structure, from the recorded config (random weights: load_compressed loads the student's)."""

    tf = transformers()
    cls = _cls(tf, base["arch"])
    config = {k: v for k, v in base["config"].items() if k not in ("dtype", "torch_dtype")}
    model = cls(cls.config_class.from_dict(config)).float().eval()
    return _floor(model, tuple(base["input_size"]), base["arch"])
