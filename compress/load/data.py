"""ImageFolder datasets from a directory or a zip of one; unreadable images are skipped and counted."""
from __future__ import annotations

import io
import os
import re
import signal
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform

from ..core.errors import InputError

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class Unreadable(str):
    """In place of (tensor, label): the name of an image that could not be decoded, so the run can say which."""


class ImageFolderData(torch.utils.data.Dataset):
    """`<class>/<image>` under a directory or inside a zip (an optional top folder is allowed).

    Classes are the sorted folder names, as in torchvision's ImageFolder; images that sit in
    no class folder make the set unlabeled (label -1). An item is (tensor, label), or an
    Unreadable (the image's name) for one that cannot be decoded (`collate` drops and names those).
    """

    def __init__(self, path: str | Path, transform, limit: int | None = None, channels: int = 3, phase: float = 0.0):
        self.path, self.transform = Path(path), transform
        self.mode = "L" if channels == 1 else "RGB"  # grayscale <-> colour to the model's channel count
        self._zip, self._zip_pid = None, None
        if not self.path.exists():
            raise InputError(f"data not found: {self.path}; pass an ImageFolder directory or a .zip of one")
        names, parts = _listing(self.path)
        if not names:
            raise InputError(f"{self.path} holds no images (.jpg, .png, ...); check the data layout")
        self.labeled = all(len(q) >= 2 for q in parts)
        folder = {n: q[-2] for n, q in zip(names, parts)} if self.labeled else {}
        self.classes = sorted(set(folder.values()))
        if limit is not None and limit < len(names):  # evenly spaced, so every class is represented
            step = (len(names) - 1) / max(limit - 1, 1)  # phase 0.5: the images half-way between those of phase 0
            names = [names[min(i, len(names) - 1)] for i in ((np.arange(limit) + phase) * step).round().astype(int)]
        self.names = names
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index[folder[n]] for n in names] if self.labeled else [-1] * len(names)

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, name: str) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        if self._zip_pid != os.getpid():  # once per process: a forked DataLoader worker must not share the
            self._zip, self._zip_pid = _open_zip(self.path), os.getpid()  # parent's handle (one file offset)
        return self._zip.read(name)

    def __getitem__(self, i: int):
        try:
            img = to_mode(Image.open(io.BytesIO(self._read(self.names[i]))), self.mode, self.names[i])
        except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError):
            return Unreadable(self.names[i])
        return self.transform(img), self.labels[i]


# A zip's listing and open handle, once per process and file version: CIFAR-10's train.zip (50,000 images) took
# 0.4 s to open and 1.2 s to list in pathlib, and one run opens it for calibration, hold-out, distillation and its
# evaluation set (2.4 s of a 2-step distillation's 23 s). Directories are listed each time (their files can change
# under an unchanged top-level mtime).
_LISTINGS: dict[tuple, tuple[list[str], list[list[str]]]] = {}
_ZIPS: dict[tuple, zipfile.ZipFile] = {}


def _version(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size, st.st_ino)


def _open_zip(path: Path) -> zipfile.ZipFile:
    key = (*_version(path), os.getpid())
    if key not in _ZIPS:  # ZipFile reads are locked per handle: datasets of one process may share it
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def _parts(name: str) -> list[str]:
    return [q for q in name.split("/") if q and q != "."]


def _listing(path: Path) -> tuple[list[str], list[list[str]]]:
    """Sorted image names (relative, '/'-separated) and each one's path components."""
    if path.is_dir():
        found = [str(p.relative_to(path)) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXT]
        names = sorted(found)
        return names, [list(Path(n).parts) for n in names]
    key = _version(path)
    if key not in _LISTINGS:
        try:
            names = sorted(n for n in _open_zip(path).namelist() if os.path.splitext(n)[1].lower() in IMAGE_EXT)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"cannot read {path}: not a valid zip ({e}); pass an ImageFolder directory or zip") from None
        _LISTINGS[key] = (names, [_parts(n) for n in names])
    return _LISTINGS[key]


def to_mode(img, mode: str, name: str):
    """The image as 8-bit L or RGB. PIL's convert() clips 16- and 32-bit integer grayscale ("I;16", "I") to 255
    instead of scaling it: a 16-bit PNG became white. Those are scaled by their bit depth here; float images have
    no agreed range and are refused in one line."""
    import numpy as np

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.int64)
        if img.mode == "I" and a.min() >= 0 and a.max() > 65535:
            raise InputError(f"image {name}: 32-bit integer grayscale is not supported; save it as 8- or 16-bit")
        shift = 8 if img.mode.startswith("I;16") or a.max() > 255 else 0  # 'I' from a 16-bit PNG: 16-bit values
        img = Image.fromarray(np.clip(a >> shift, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise InputError(f"image {name}: floating-point pixels (mode F) have no agreed range; save it as an 8- or "
                         "16-bit PNG or JPEG")
    return img.convert(mode)


class Augmented(torch.utils.data.Dataset):
    """Light training augmentation (reflect-pad random crop, horizontal flip) on the eval tensor.

    Items are addressed as (index, key): the key seeds the randomness, so a sample looks the
    same whichever process, worker or resumed run draws it.
    """

    def __init__(self, base: ImageFolderData):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        i, key = item
        got = self.base[i]
        if isinstance(got, Unreadable):
            return got
        x, y = got
        g = torch.Generator().manual_seed(int(key))
        h, w = x.shape[-2:]
        pad = max(1, min(h, w) // 8)
        x = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="reflect").squeeze(0)
        top, left = (int(torch.randint(0, 2 * pad + 1, (1,), generator=g)) for _ in range(2))
        x = x[:, top:top + h, left:left + w]
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(-1)
        return x, y


def collate(batch):
    """Stack readable items; returns (images, labels, names of the unreadable images dropped)."""
    good = [b for b in batch if not isinstance(b, Unreadable)]
    bad = [str(b) for b in batch if isinstance(b, Unreadable)]
    if not good:
        return None, None, bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good]), bad


def unreadable_warning(what: str, count: int, first: str | None, path) -> str | None:
    """The terminal line for images skipped as unreadable (report.json counts them too), or None for none."""
    if not count:
        return None
    return (f"warning: {what}: {count} unreadable image{'s' if count > 1 else ''} in {path} skipped (first: {first}); "
            "remove or re-encode them")


def resolve_preprocess(cfg: dict, channels: int | None, pre) -> tuple[dict, str | None]:
    """The recipe's `model.preprocess` over the checkpoint's data config, with the model's channel count.

    A model with one input channel gets grayscale images and, unless told, the mean of the 3-channel
    mean/std; the reverse (3 values expected, 1 given) repeats the value.
    """
    cfg = dict(cfg)
    if pre is not None:
        for key in ("mean", "std", "interpolation", "crop_pct"):
            if getattr(pre, key) is not None:
                cfg[key] = tuple(getattr(pre, key)) if key in ("mean", "std") else getattr(pre, key)
        if pre.input_size is not None:
            if channels is not None and pre.input_size[0] != channels:
                raise InputError(f"model.preprocess.input_size says {pre.input_size[0]} channels but the model's first "
                                 f"convolution takes {channels}; set input_size to [{channels}, ...]")
            cfg["input_size"] = tuple(pre.input_size)
    notes = []
    c = channels or cfg["input_size"][0]
    if cfg["input_size"][0] != c:
        cfg["input_size"] = (c, *cfg["input_size"][1:])
    for key in ("mean", "std"):
        v = tuple(cfg[key])
        if len(v) != c:
            cfg[key] = (sum(v) / len(v),) if c == 1 else v * c if len(v) == 1 else v
            notes.append(f"{key} {tuple(round(x, 4) for x in cfg[key])}")
    if notes:
        return cfg, (f"the model takes {c}-channel images: {', '.join(notes)} derived from the 3-channel values; "
                     "set model.preprocess mean/std if it was trained with others")
    return cfg, None


def eval_transform(data_cfg: dict):
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: data_cfg[k] for k in keys if k in data_cfg}, is_training=False)


def dataset(path, data_cfg: dict, limit: int | None = None, phase: float = 0.0) -> ImageFolderData:
    return ImageFolderData(path, eval_transform(data_cfg), limit, data_cfg["input_size"][0], phase)


def worker_death(e: BaseException, batches) -> str | None:
    """How a DataLoader worker died ("was killed by signal Killed", "exited unexpectedly") when `e` is what its death
    raised in the main process, else None: PyTorch's RuntimeError, or a ConnectionResetError/EOFError from a batch
    the dead worker was handing over. Slurm's stop and a terminal's Ctrl-C signal every process of the job, workers
    too: a worker that died of it first ended the run as `internal error: DataLoader worker ... killed by signal:
    Terminated` (exit 1). (Workers that ignore the signal are no fix: PyTorch ends a stuck worker with SIGTERM.)"""
    first = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, RuntimeError) and re.match(r"DataLoader worker \(pid", first):
        m = re.search(r"is killed by signal: (.+?)\.? *$", first)
        return f"was killed by signal {m.group(1).strip()}" if m else "exited unexpectedly"
    if isinstance(e, (ConnectionResetError, EOFError)):
        deadline = time.monotonic() + 2.0  # the socket is reset as the worker dies, a moment before it can be reaped
        while time.monotonic() < deadline:
            for w in getattr(batches, "_workers", []):
                code = w.exitcode
                if code is not None:
                    return f"was killed by signal {signal.strsignal(-code)}" if code < 0 else "exited unexpectedly"
            time.sleep(0.05)
    return None


def loader(path, data_cfg: dict, *, limit: int | None, batch_size: int = 64, workers: int = 0, phase: float = 0.0):
    ds = dataset(path, data_cfg, limit, phase)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=workers)


def calibration_batch(path, data_cfg: dict, n: int, seed: int, *, holdout: bool = False,
                      log=None) -> tuple[torch.Tensor, str]:
    """n preprocessed images from `path`, or seeded random inputs when no data is given.

    holdout: n other images (half-way between the calibration ones; another seed for random inputs), on
    which rewrites fitted to the calibration batch are scored without flattering them. log: where a
    warning about unreadable images goes (the terminal), besides the description.
    """
    if path is None:
        g = torch.Generator().manual_seed(seed + holdout)
        return torch.randn((n, *data_cfg["input_size"]), generator=g), (f"{n} random N(0,1) inputs (seed {seed + holdout}; "
                                                                         "agreement on them is not a fidelity figure)")
    ds, dl = loader(path, data_cfg, limit=n, batch_size=n, phase=0.5 if holdout else 0.0)
    x, _, bad = next(iter(dl))
    if x is None:
        raise InputError(f"{path}: none of the {len(ds)} calibration images could be read; check the data")
    warn = unreadable_warning("held-out images" if holdout else "calibration", len(bad), bad[0] if bad else None, path)
    if warn and log is not None:
        log(warn)
    if len(ds) < n:  # fewer than asked is the user's to know: a fit on 1 image where 16 were meant looks the same
        short = (f"warning: {n} {'held-out' if holdout else 'calibration'} images asked but {path} holds only "
                 f"{len(ds)}: using those; add images or ask for fewer (calibration.images, --images)")
        (log or (lambda m: print(m, file=sys.stderr)))(short)
    return x, f"{len(x)} images from {path}" + (f" ({len(bad)} unreadable skipped, first {bad[0]})" if bad else "")


WNID = re.compile(r"n\d{8}")


def imagenet_labels(ds: ImageFolderData, outputs: int) -> str | None:
    """Class folders named by ImageNet wnids (n01440764, ...) on a 1000-way model: each image's label becomes its
    class's index in the standard ImageNet order (timm's ImageNetInfo), not the folder's rank among those present
    (a subset such as ImageWoof would otherwise be scored against classes 0-9). Returns what was done, or None."""
    if not ds.labeled or outputs != 1000 or not all(WNID.fullmatch(c) for c in ds.classes):
        return None
    from timm.data import ImageNetInfo

    index = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
    if not all(c in index for c in ds.classes):
        return None
    ds.labels = [index[ds.classes[i]] if i >= 0 else i for i in ds.labels]
    return (f"the {len(ds.classes)} class folders are ImageNet wnids: labels are their indices among the model's 1000 "
            "outputs in the standard ImageNet order (timm ImageNetInfo), not the sorted folder positions")


def chance_warning(ev: dict, classes: int, path) -> str | None:
    """One line when the teacher's own top-1 is under twice chance: the labels most likely do not name its classes."""
    top1 = ev.get("teacher_top1")
    if top1 is None or not classes or top1 >= 2 / classes:
        return None
    return (f"the teacher's own top-1 on {path} is {100 * top1:.1f}%, under twice chance ({200 / classes:.1f}% for "
            f"{classes} classes): the folder labels and the model's classes may not match, so top-1 figures mean little")
