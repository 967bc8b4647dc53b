"""Checkpoint readers -> (model, adapter, data config). Never executes pickled code."""
from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import timm
import timm.data
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..adapters import Adapter, detect
from ..core.errors import InputError, not_a_file, read_json
from ..core.registry import PassContext, get_pass
from ..passes.applicable import why_not
from ..recipe import ModelSpec, parse_recipe
from . import checkpoint, sources
from .data import resolve_preprocess
from .frozen import freeze_weight_norm_convs
from .sources import hf, user
from .sources import torchvision as tv
from .sources.common import Converted, fit
from .sources.detect import guess_arch
from .sources.timm_src import create

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")  # save_pretrained's sharded forms


@dataclass
class Loaded:
    model: nn.Module
    adapter: Adapter
    data_cfg: dict  # timm data config: input_size, mean, std, interpolation, crop_pct
    source: dict = field(default_factory=dict)  # what was read and how, for the report
    save_back: Callable | None = None  # writes a student in the original family's layout (HF, torchvision)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file, whatever its name (see checkpoint.read)."""
    return checkpoint.read(path)[0]


def _timm_name(arch: str) -> str:
    kind, _, name = arch.partition(":")
    return name if kind == "timm" and name else arch


def _data_cfg(model: nn.Module, adapter: Adapter, pretrained_cfg: dict | None, img_size: int | None = None) -> dict:
    if pretrained_cfg:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **pretrained_cfg}
    cfg = timm.data.resolve_data_config(model=model)
    size = adapter.input_size(model)
    if size is not None:  # a ViT's patch embedding fixes its input size, whatever the config says
        cfg["input_size"] = tuple(size)
    elif img_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], img_size, img_size)
    cfg["crop_pct"] = cfg.get("crop_pct") if pretrained_cfg else 1.0  # no config: no implied crop
    return cfg


def load(ckpt: str, spec: ModelSpec | None = None) -> Loaded:
    """`_load`, then the recipe's model.preprocess (and the model's channel count) on top of what the checkpoint said."""
    loaded = _load(ckpt, spec)
    frozen = freeze_weight_norm_convs(loaded.model)
    if frozen:
        loaded.source["frozen"] = (f"{len(frozen)} weight-standardised convs computed once into plain convs "
                                   "(exact: their weight does not depend on the input)")
    chans = next((m.in_channels for m in loaded.model.modules() if isinstance(m, nn.Conv2d)), None)
    pre = spec.preprocess if spec is not None else None
    loaded.data_cfg, notes = resolve_preprocess(loaded.data_cfg, chans, pre)
    loaded.source["preprocess"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.data_cfg.items()}
    if notes:
        loaded.source["preprocess_note"] = notes
    if loaded.source.get("preprocess_assumed") and (pre is None or pre.mean is None or pre.std is None):
        loaded.source["preprocess_warning"] = _assumed(loaded)
    return loaded


def _assumed(loaded: Loaded) -> str:
    """Nothing read says how the images were normalised: the values used, and how to give the right ones.
    (The shared CIFAR ViT as bare weights ran at mean = std = 0.5, timm's default for its arch: 32.5% top-1,
    against 62.5% with the CIFAR values its directory records.)"""
    c = loaded.data_cfg
    fmt = lambda v: "[" + ", ".join(f"{x:g}" for x in v) + "]"  # noqa: E731
    return (f"{Path(loaded.source.get('path', 'the checkpoint')).name} records no "
            f"preprocessing: assumed the defaults of {loaded.source.get('arch')}: mean {fmt(c['mean'])}, std {fmt(c['std'])}, "
            f"{c.get('interpolation', 'bilinear')}, crop_pct {c.get('crop_pct', 1.0):g}; if it was trained with others, "
            f"set model.preprocess: {{mean: [...], std: [...]}} in the recipe")


def _load(ckpt: str, spec: ModelSpec | None = None) -> Loaded:
    """Load a checkpoint: a timm or Hugging Face directory, a weights file (+ `spec`, else its keys say
    the family), or a timm:/hf: hub id. Other families are converted to timm form, checked numerically."""
    if ckpt.startswith(("timm:", "hf:")) and not Path(ckpt).exists():
        return _load_hub(ckpt)
    path = Path(ckpt)
    if not path.exists():
        why = not_a_file(path)  # a symlink loop or a dangling link is not "not found"
        raise InputError(f"checkpoint {path} {why}; check the path" if why else f"checkpoint not found: {path}; check the path")
    config = None
    if path.is_dir():
        config = _read_config(path)
        weights = next((path / n for n in (*WEIGHT_FILES, *SHARD_INDEXES) if (path / n).is_file()), None)
        if weights is None:
            raise InputError(f"{path}: no weights file ({', '.join(WEIGHT_FILES)}) and no shard index "
                             f"({', '.join(SHARD_INDEXES)})")
    else:
        weights = path  # any name: the content says the format
    key = spec.weights_key if spec is not None else None
    sharded = weights.name in SHARD_INDEXES
    sd, read_info = (checkpoint.read_sharded if sharded else checkpoint.read)(weights, key)
    nbytes = (sum(f.stat().st_size for f in {weights.parent / n for n in read_json(weights, "")["weight_map"].values()})
              if sharded else weights.stat().st_size)
    info = {"path": str(path), "weights": str(weights), "bytes": nbytes, "checkpoint": read_info,
            "read": checkpoint.describe(read_info)}
    if config is not None and "architecture" not in config:  # a Hugging Face directory: its config says the rest
        size = spec.img_size if spec is not None else None  # a convnet's input size, where no preprocessor config says it
        return _converted(hf.read(path, config, weights, sd), info, f"hf:{hf.architecture(config, path)}", {}, size)
    if spec is not None:
        arch, nc, size, kwargs = spec.arch, spec.num_classes, spec.img_size, spec.kwargs
    elif config is not None:
        arch, nc, size, kwargs = f"timm:{config['architecture']}", config.get("num_classes"), None, config.get("model_args", {})
    else:
        arch, kwargs = guess_arch(sd, weights)
        nc = size = None
        info["detected"] = f"model.arch {arch} from the weights' keys"
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        return _converted(tv.read(name, kwargs, nc, size, sd, weights), info, arch, kwargs, size)
    if kind == "hf":
        raise InputError(f"model.arch '{arch}': a Hugging Face model is read from its directory (config.json + weights); "
                         "pass the directory as the checkpoint and drop the model: section")
    if name and kind != "timm":
        return _converted(user.read(arch, kwargs, nc, size, sd, weights), info, arch, kwargs, size)
    name = _timm_name(arch)
    model = _create_fit(name, nc, size, kwargs, sd, weights)
    adapter = detect(model)
    pcfg = (config or {}).get("pretrained_cfg")
    source = {**info, "arch": f"timm:{name}", "kwargs": {**kwargs, **({"num_classes": nc} if nc else {}), **({"img_size": size} if size else {})},
              "adapter": adapter.name, "family": adapter.family, **({} if pcfg else {"preprocess_assumed": True})}
    return Loaded(model, adapter, _data_cfg(model, adapter, pcfg, size), source)


def _create_fit(name: str, nc, size, kwargs: dict, sd: dict, weights: Path) -> nn.Module:
    """The timm model holding the checkpoint's tensors. Built on the meta device and given sd's tensors
    (one copy of the weights in memory, no random init: ViT-L peaked at 2.6x its weights with a copy);
    built for real and copied into when that cannot work: shared weights, a buffer the checkpoint lacks,
    another dtype, or a constructor that needs real values."""
    what = f"timm '{name}'"
    try:
        with torch.device("meta"):
            model = create(name, nc, size, kwargs)
    except InputError:
        raise
    except Exception:  # noqa: BLE001 - a constructor that computes on real values: build it for real below
        model = None
    if model is not None and _assignable(model, sd):
        fit(model, sd, what, weights, assign=True)
        if not any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            return model.eval()
    model = create(name, nc, size, kwargs)
    fit(model, sd, what, weights)
    return model.eval()


def _assignable(model: nn.Module, sd: dict) -> bool:
    """Whether sd's tensors can become the model's as they are: no tied parameters (assigning unties them),
    every buffer in the checkpoint, the same dtypes."""
    named = dict(model.named_parameters(remove_duplicate=False))
    if len(named) != len(dict(model.named_parameters())):
        return False
    own = {**named, **dict(model.named_buffers())}
    return all(k in sd and sd[k].dtype == v.dtype for k, v in own.items())


def _read_config(path: Path) -> dict:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{path} is a directory without config.json; pass the weights file and set model.arch in the recipe")
    config = read_json(cfg_path, "repair or regenerate it")
    if not isinstance(config, dict) or not {"architecture", "architectures", "model_type"} & set(config):
        keys = ", ".join(sorted(config)[:8]) if isinstance(config, dict) else type(config).__name__
        raise InputError(f"{cfg_path}: neither a timm config ('architecture') nor a Hugging Face one ('architectures', "
                         f"'model_type'); keys: {keys}")
    return config


def _converted(conv: Converted, info: dict, arch: str, kwargs: dict, img_size) -> Loaded:
    model = conv.model.eval()
    adapter = conv.adapter or detect(model)
    source = {**info, "arch": arch, "kwargs": kwargs, **conv.source, "base": conv.base,
              "adapter": adapter.name, "family": adapter.family}
    if str(conv.source.get("read_as", "")).startswith("user:"):  # your factory: ImageNet values were assumed
        source["preprocess_assumed"] = True
    return Loaded(model, adapter, _data_cfg(model, adapter, conv.pretrained_cfg, img_size), source, conv.save_back)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A name lookup of the hub host, bounded in time, so offline runs fail at once, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True  # the user asked for the local cache; the hub client then fails fast by itself
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list = []
    t = threading.Thread(target=lambda: result.append(_resolves(host)), daemon=True)
    t.start()
    t.join(timeout)
    return bool(result and result[0])


def _resolves(host: str) -> bool:
    try:
        return bool(socket.getaddrinfo(host, 443))
    except OSError:
        return False


def _load_hub(ckpt: str) -> Loaded:
    kind, _, name = ckpt.partition(":")
    if not _hub_reachable():
        raise InputError(f"cannot reach the model hub to fetch {ckpt} (offline?); pass a local checkpoint path instead")
    try:
        if kind == "hf":  # the directory files only, then read like a local HF or timm directory
            from huggingface_hub import snapshot_download

            folder = snapshot_download(name, allow_patterns=["config.json", "preprocessor_config.json", "model.safetensors"])
        else:
            model = timm.create_model(name, pretrained=True).eval()
    except Exception as e:  # noqa: BLE001 - any hub/network failure ends the same way for the user
        raise InputError(f"could not fetch {ckpt} from the hub ({type(e).__name__}); offline? pass a local checkpoint path instead") from None
    if kind == "hf":
        loaded = load(folder)
        loaded.source["path"] = ckpt
        return loaded
    adapter = detect(model)
    source = {"path": ckpt, "arch": f"timm:{name}", "kwargs": {}, "adapter": adapter.name, "family": adapter.family}
    return Loaded(model, adapter, _data_cfg(model, adapter, None), source)


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild a model written by `compress apply` (its directory or model.safetensors).

    The base architecture is built from the metadata, the recipe's passes are replayed on it
    for their structure (resolved configs make that deterministic), then the weights load strictly.
    """
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file} not found; pass a directory written by `compress apply` or its model.safetensors")
    try:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise InputError(f"cannot read {file}: {e}") from None
    if "recipe" not in meta or "source_kwargs" not in meta:
        raise InputError(f"{file} was not written by compress apply (no recipe metadata); load it with timm instead")
    recipe = parse_recipe(json.loads(meta["recipe"]))
    kwargs = json.loads(meta["source_kwargs"])
    base = json.loads(meta.get("source_base", "null"))
    if base is not None:
        model, adapter = sources.rebuild(base)
    else:
        model = create(_timm_name(meta["source_arch"]), kwargs.pop("num_classes", None), kwargs.pop("img_size", None), kwargs)
        adapter = detect(model)
    freeze_weight_norm_convs(model)  # as `load` did before the passes ran
    structure = json.loads(meta.get("structure", "null")) or [{} for _ in recipe.steps]
    for step, details in zip(recipe.steps, structure):
        spec = get_pass(step.name)
        if not why_not(step.name, spec, adapter, model):  # a pass the run skipped (skip_inapplicable) is skipped here
            model = spec.fn(model, adapter, step.config, PassContext(calib=None, replay=details)).model
    fit(model, read_state_dict(file), "the structure its recipe describes", file)
    return model.eval()
