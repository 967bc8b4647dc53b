"""Per-stage memory for profiling conversions at scale: with COMPRESS_RSS_LOG=FILE set, each `mark(name)` appends
one JSON line to FILE: the stage that just ended, its seconds, its peak RSS and the RSS at its end. The peak is the
kernel's own high-water mark (VmHWM), reset at every mark (/proc/self/clear_refs), so no spike between two samples
is missed. Unset (the normal case), `mark` returns at once."""
from __future__ import annotations

import json
import os
import time

_state: dict = {}


def _status(*keys: str) -> list[int]:
    """Bytes of the given /proc/self/status fields (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        got = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(keys)}
    return [got.get(k, 0) for k in keys]


def rss() -> int | None:
    """This process's resident bytes (VmRSS); None where /proc cannot be read."""
    try:
        return _status("VmRSS")[0]
    except OSError:
        return None


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then each stage's peak is the peak so far


def mark(name: str) -> None:
    """Close the stage `name` (everything since the previous mark) in the log; nothing when the log is off."""
    path = os.environ.get("COMPRESS_RSS_LOG")
    if not path:
        return
    now, peak = _status("VmRSS", "VmHWM")
    t = time.perf_counter()
    secs = t - _state.get("t", t)
    _state.setdefault("t0", t)
    _state["t"] = t
    line = {"stage": name, "s": round(secs, 2), "at_s": round(t - _state["t0"], 1), "peak_gb": round(peak / 1e9, 3),
            "end_gb": round(now / 1e9, 3), "pid": os.getpid()}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    _reset_peak()
