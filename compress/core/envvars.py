"""Every environment variable compress reads, checked once at the CLI's edge: a bad value is one line, exit 2.

Schedulers set these (torchrun, PyTorchJob and Slurm containers: WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); a typo there used to surface as a ValueError traceback (exit 1) or a rendezvous that never ends.
"""
from __future__ import annotations

import os

from .errors import InputError

RENDEZVOUS_TIMEOUT_S = 300.0


def _int(name: str, lo: int, hi: int | None = None, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise InputError(f"environment variable {name}={text!r}: expected a whole number {span}; fix or unset it")
    return value


def _seconds(name: str, default: float, zero: bool = False) -> float:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise InputError(f"environment variable {name}={text!r}: expected seconds {'>=' if zero else '>'} 0, e.g. {name}={default:g}; "
                         "fix or unset it")
    return value


def check() -> None:
    """The variables every command may read (cheap; no import of torch)."""
    _seconds("COMPRESS_PROGRESS_S", 5, zero=True)
    rendezvous_timeout()
    world()


def rendezvous_timeout() -> float:
    return _seconds("COMPRESS_RENDEZVOUS_TIMEOUT_S", RENDEZVOUS_TIMEOUT_S)


def world() -> dict | None:
    """None for a single process; else WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, all checked."""
    size = _int("WORLD_SIZE", 1, default=1)
    if size == 1:
        return None
    missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise InputError(f"WORLD_SIZE={size} but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; "
                         "start the ranks with torchrun (it sets them all) or unset WORLD_SIZE for one process")
    return {"world_size": size, "rank": _int("RANK", 0, size - 1), "local_rank": _int("LOCAL_RANK", 0, default=0),
            "master_addr": os.environ["MASTER_ADDR"], "master_port": _int("MASTER_PORT", 1, 65535)}
