"""Family readers: each turns a checkpoint of its family into the form the adapters know, verified."""
from __future__ import annotations

from torch import nn


def rebuild(base: dict) -> tuple[nn.Module, object]:
    """The base structure recorded in a result's metadata, without the original library (load_compressed)."""
    from ...adapters import detect
    from . import timm_src, user

    if base.get("builder") == "user":
        return user.rebuild(base)
    if base.get("builder") == "hf":
        from . import hf_any

        return hf_any.rebuild(base)
    model = timm_src.build(base)
    return model, detect(model)
