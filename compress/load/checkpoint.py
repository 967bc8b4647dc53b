"""Read a weights file by its content (not its name), unwrap the usual containers, undo the usual key
prefixes and fill what older PyTorch versions did not save. Never executes pickled code."""
from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..core.errors import InputError, not_a_file, read_json
from . import unpickle
from .unpickle import numpy_globals

# Containers a training script wraps its weights in, by what they hold; the plain weights win over EMA ones
# unless the recipe says `model.weights_key`.
PLAIN = ("state_dict", "model_state_dict", "model", "net", "network", "params", "weights", "module", "model_state")
EMA = ("state_dict_ema", "model_ema", "ema", "ema_state_dict", "ema_model", "model_ema_state_dict")
PREFIXES = ("module.", "_orig_mod.", "model.")  # DataParallel/DDP, torch.compile, Lightning / wrapper modules


def sniff(path: Path) -> str:
    """'safetensors', 'torch-zip' or 'torch-legacy', from the first bytes; else one line saying what it is not."""
    with open(path, "rb") as f:
        head = f.read(16)
        f.seek(257)
        tar = f.read(5) == b"ustar"  # PyTorch < 0.4's tar format, which torch.load still reads
    size = path.stat().st_size
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"
    if tar or head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle stream: torch's legacy (non-zip) format
        return "torch-legacy"
    raise InputError(f"cannot read {path}: its content is neither safetensors nor a PyTorch checkpoint (zip or legacy "
                     f"pickle; it starts with {head[:8]!r}); pass the weights file itself")


def _read_safetensors(path: Path) -> dict:
    """Each tensor in its own memory (safetensors >= 0.8's pread backend). The default backend's tensors are views of
    one mapping of the whole file, kept (and counted in RSS) while any of them lives: a model that adopts them and
    is then rewritten in place kept its replaced weights' pages (ViT-L: 1.2 GB)."""
    try:
        return load_file(str(path), backend="pread")
    except TypeError:  # an older safetensors: no backend argument
        return load_file(str(path))


def _load(path: Path, fmt: str) -> tuple[object, list[str]]:
    """(the file's content, classes that became inert placeholders): tensors and plain values through torch's
    weights_only reader; a checkpoint that also carries a run's config objects through `unpickle` (no code runs)."""
    if fmt == "safetensors":
        try:
            return _read_safetensors(path), []
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"cannot read {path}: not a valid safetensors file, truncated or corrupt ({e}); "
                             "re-export or re-download it") from None

    if fmt == "torch-zip":  # a zip that is no PyTorch checkpoint is said as such, not as "pickled objects"
        why = _zip_problem(path)
        if why:
            raise InputError(f"cannot read {path}: {why}; pass a PyTorch checkpoint or .safetensors file, or re-export it")

    def refuse(name: str | None):
        what = f" (it references {name})" if name else ""
        raise InputError(f"refusing to load {path}: it holds pickled Python objects beyond tensors, which could run "
                         f"code{what}; re-save it as a plain state dict or as .safetensors") from None

    try:
        try:
            with torch.serialization.safe_globals(numpy_globals()):
                return torch.load(path, map_location="cpu", weights_only=True), []
        except pickle.UnpicklingError:  # a global torch does not know: the restricted reader names it or keeps it inert
            return unpickle.load(path, refuse)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error, pickle.UnpicklingError,
            AttributeError, IndexError, TypeError) as e:
        raise InputError(f"cannot read {path}: truncated or not a PyTorch checkpoint "
                         f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); re-export it") from None


def _zip_problem(path: Path) -> str | None:
    """Why a file that starts like a zip is not a PyTorch checkpoint (None: it may be one): every torch.save zip
    holds ARCHIVE/data.pkl; a corrupt or foreign zip used to reach the pickle reader and be called dangerous."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"not a PyTorch checkpoint: a corrupt or truncated zip archive ({e})"
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return f"not a PyTorch checkpoint: a zip archive without data.pkl among its {len(names)} entries"
    return None


def _is_sd(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _mappings(d, path: str = "", depth: int = 0) -> list[str]:
    """Dotted paths of every non-empty mapping of tensors inside `d` (not below one)."""
    if _is_sd(d):
        return [path]
    if not isinstance(d, dict) or depth > 3:
        return []
    return [p for k, v in d.items() if isinstance(k, str) for p in _mappings(v, f"{path}.{k}" if path else k, depth + 1)]


def _at(d, key: str):
    for part in key.split("."):
        d = d[part]
    return d


def unwrap(obj, path: Path, weights_key: str | None = None) -> tuple[dict, str]:
    """The state dict inside a checkpoint and one phrase saying which was taken and why."""
    if _is_sd(obj) and weights_key is None:
        return obj, "a plain state dict"
    found = _mappings(obj)
    top = obj if isinstance(obj, dict) else {}
    listing = ", ".join(found[:6]) or "none"
    if weights_key is not None:
        group = EMA if weights_key == "ema" else PLAIN if weights_key == "plain" else (weights_key,)
        key = next((k for k in group if k in found), None)
        if key is None:
            raise InputError(f"model.weights_key '{weights_key}': {path} has no such mapping of tensors "
                             f"(it holds: {listing}); pick one of those")
        return _at(obj, key), f"'{key}', as model.weights_key '{weights_key}' asks"
    lightning = "pytorch-lightning_version" in top
    for key in PLAIN:
        if key in found:
            ema = [k for k in EMA if k in found]
            why = f"'{key}'" + (f" (Lightning checkpoint, version {top['pytorch-lightning_version']})" if lightning else "")
            why += f"; it also holds EMA weights '{ema[0]}' (model.weights_key: ema takes them)" if ema else ""
            return _at(obj, key), why
    ema = [k for k in EMA if k in found]
    if ema:
        return _at(obj, ema[0]), f"'{ema[0]}' (the only weights it holds are EMA weights)"
    if len(found) == 1:
        return _at(obj, found[0]), f"'{found[0]}', the one mapping of tensors inside (a container key not known by name)"
    if found:
        raise InputError(f"{path} holds several mappings of tensors ({listing}); choose one with model.weights_key")
    raise InputError(f"{path} is not a state dict of tensors (found {type(obj).__name__}"
                     f"{' with keys ' + ', '.join(map(str, list(top)[:6])) if top else ''}); "
                     "save model.state_dict() (or safetensors) instead")


def strip_prefixes(sd: dict) -> tuple[dict, list[str]]:
    """Drop a wrapper prefix shared by every key (`fit` puts one back if the model itself has it)."""
    stripped = []
    while len(sd) and (p := next((p for p in PREFIXES if all(k.startswith(p) for k in sd)), None)):
        sd = {k[len(p):]: v for k, v in sd.items()}
        stripped.append(p)
    return sd, stripped


def fill_batch_counts(sd: dict) -> tuple[dict, list[str]]:
    """BatchNorm layers saved before PyTorch 0.4.1 lack `num_batches_tracked`; load_state_dict fills 0, as here."""
    missing = [k[: -len("running_var")] for k in sd if k.endswith("running_var")
               and f"{k[: -len('running_var')]}running_mean" in sd and f"{k[: -len('running_var')]}num_batches_tracked" not in sd]
    if not missing:
        return sd, []
    out = dict(sd)
    for p in missing:
        out[f"{p}num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out, missing


def to_float32(sd: dict) -> tuple[dict, str | None]:
    """Half-precision weights as float32 (the passes, the checks and ONNX Runtime's CPU kernels compute in float32),
    and the saved dtype(s), or None when nothing was cast."""
    low = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values() if v.dtype in (torch.float16, torch.bfloat16)})
    if not low:
        return sd, None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, "/".join(low)


def _check(path: Path) -> None:
    if not path.is_file():
        why = not_a_file(path)  # a FIFO, a folder, a symlink loop: said as such, not "not found"
        raise InputError(f"checkpoint {path} {why}; pass the weights file itself" if why else
                         f"checkpoint not found: {path}; check the path")
    if path.stat().st_size == 0:
        raise InputError(f"checkpoint {path} is empty (0 bytes); re-export or re-download it")


def read(path: Path, weights_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, what was read and repaired, for the report's source section)."""
    _check(path)
    fmt = sniff(path)
    obj, placeholders = _load(path, fmt)
    sd, container = unwrap(obj, path, weights_key)
    return _finish(sd, path, {"format": fmt, "container": container}, placeholders)


def read_sharded(index: Path, weights_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A Hugging Face sharded checkpoint: the shards its index lists (`weight_map`), merged; each is read as `read` does."""
    meta = read_json(index, "repair it or save the model again with save_pretrained")
    wmap = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise InputError(f"{index}: no 'weight_map' of tensor name -> shard file; save the model again with save_pretrained")
    sd, fmts, placeholders = {}, set(), set()
    shards = sorted(set(wmap.values()))
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise InputError(f"{index} lists shard {name}, which is not in {index.parent}; copy the whole directory")
        _check(shard)
        fmt = sniff(shard)
        obj, found = _load(shard, fmt)
        part, _ = unwrap(obj, shard, weights_key)
        sd.update(part)
        fmts.add(fmt)
        placeholders.update(found)
    listed = set(wmap) - set(sd)
    if listed:
        raise InputError(f"{index}: {len(listed)} tensors it lists are in none of its shards (e.g. {sorted(listed)[0]}); "
                         "the shards do not belong to this index, save the model again")
    info = {"format": "/".join(sorted(fmts)), "container": f"{len(shards)} shards listed in {index.name}"}
    return _finish(sd, index, info, sorted(placeholders))


def _finish(sd: dict, path: Path, info: dict, placeholders: list[str]) -> tuple[dict, dict]:
    sd, stripped = strip_prefixes(sd)
    repairs = [f"key prefix '{p}' removed from all {len(sd)} keys" for p in stripped]
    sd, filled = fill_batch_counts(sd)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"{path}: tensor '{k}' contains NaN or Inf; the checkpoint is broken, use another one")
    if filled:
        repairs.append(f"num_batches_tracked filled with 0 for {len(filled)} BatchNorm layers (saved by an older "
                       f"PyTorch; load_state_dict does the same), e.g. {filled[0].rstrip('.')}")
    sd, saved = to_float32(sd)
    info = {**info, "repairs": repairs}
    if saved:
        info["dtype"] = {"saved": saved, "computed": "float32"}
    if placeholders:  # classes beside the weights, recorded by name and never constructed
        info["placeholders"] = placeholders
    return sd, info


def describe(info: dict) -> str:
    """One log line for the terminal."""
    names = {"safetensors": "safetensors", "torch-zip": "PyTorch zip", "torch-legacy": "legacy (pre-1.6) PyTorch"}
    fmt = "/".join(names[f] for f in info["format"].split("/"))
    rep = "; ".join(info["repairs"])
    line = f"read {fmt} weights, {info['container']}" + (f"; repaired: {rep}" if rep else "")
    if info.get("placeholders"):
        line += (f"; objects of {len(info['placeholders'])} classes beside the weights kept as inert placeholders, not "
                 f"constructed ({', '.join(info['placeholders'][:4])}{', ...' if len(info['placeholders']) > 4 else ''})")
    if info.get("dtype"):
        line += f"; note: saved in {info['dtype']['saved']}, loaded and computed in float32"
    return line
