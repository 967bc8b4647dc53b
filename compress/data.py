"""ImageFolder datasets from a directory or a zip of one; unreadable images are skipped and counted."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform

from .errors import InputError

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ImageFolderData(torch.utils.data.Dataset):
    """`<class>/<image>` under a directory or inside a zip (an optional top folder is allowed).

    Classes are the sorted folder names, as in torchvision's ImageFolder. Returns
    (tensor, label) or None for an image that cannot be decoded (see `collate`).
    """

    def __init__(self, path: str | Path, transform, limit: int | None = None):
        self.path, self.transform = Path(path), transform
        self._zip = None
        if not self.path.exists():
            raise InputError(f"data not found: {self.path}; pass an ImageFolder directory or a .zip of one")
        if self.path.is_dir():
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXT]
        else:
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = [n for n in z.namelist() if Path(n).suffix.lower() in IMAGE_EXT]
            except (zipfile.BadZipFile, OSError) as e:
                raise InputError(f"cannot read {self.path}: not a valid zip ({e}); pass an ImageFolder directory or zip") from None
        names = sorted(n for n in names if len(Path(n).parts) >= 2)
        if not names:
            raise InputError(f"{self.path} holds no images in <class>/<image> folders; check the data layout")
        self.classes = sorted({Path(n).parts[-2] for n in names})
        if limit is not None and limit < len(names):  # evenly spaced, so every class is represented
            names = [names[i] for i in np.linspace(0, len(names) - 1, limit).round().astype(int)]
        self.names = names
        self.labels = [self.classes.index(Path(n).parts[-2]) for n in names]
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, name: str) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        if self._zip is None:  # opened lazily, once per worker process
            self._zip = zipfile.ZipFile(self.path)
        return self._zip.read(name)

    def __getitem__(self, i: int):
        try:
            img = Image.open(io.BytesIO(self._read(self.names[i])))
            img = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, zipfile.BadZipFile):
            self.skipped.append(self.names[i])
            return None
        return self.transform(img), self.labels[i]


def collate(batch):
    """Drop unreadable images (None) from a batch."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def eval_transform(data_cfg: dict):
    return create_transform(**{k: data_cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode") if k in data_cfg}, is_training=False)


def loader(path, data_cfg: dict, *, limit: int | None, batch_size: int = 64) -> tuple[ImageFolderData, torch.utils.data.DataLoader]:
    ds = ImageFolderData(path, eval_transform(data_cfg), limit)
    return ds, torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate)


def calibration_batch(path, data_cfg: dict, n: int, seed: int) -> tuple[torch.Tensor, str]:
    """n preprocessed images from `path`, or seeded random inputs when no data is given."""
    if path is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, *data_cfg["input_size"]), generator=g), f"{n} random N(0,1) inputs (seed {seed})"
    ds, dl = loader(path, data_cfg, limit=n, batch_size=n)
    batch = next((b for b in dl if b is not None), None)
    if batch is None:
        raise InputError(f"{path}: none of the {len(ds)} calibration images could be read; check the data")
    return batch[0], f"{len(batch[0])} images from {path}"
