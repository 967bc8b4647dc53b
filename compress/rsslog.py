"""Per-stage memory for profiling conversions at scale: with COMPRESS_RSS_LOG=FILE set, a thread reads this
process's VmRSS every 50 ms and each `mark(name)` appends one JSON line to FILE: the stage that just ended, its
seconds, its peak RSS and the RSS at its end. Unset (the normal case), `mark` returns at once and no thread runs."""
from __future__ import annotations

import json
import os
import threading
import time

PERIOD_S = 0.05
_state: dict = {}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _sample() -> None:
    while True:
        r = _rss()
        with _state["lock"]:
            _state["peak"] = max(_state["peak"], r)
        time.sleep(PERIOD_S)


def _start(path: str) -> None:
    now = _rss()
    _state.update(path=path, lock=threading.Lock(), peak=now, t=time.perf_counter(), t0=time.perf_counter())
    threading.Thread(target=_sample, name="rsslog", daemon=True).start()


def mark(name: str) -> None:
    """Close the stage `name` (everything since the previous mark) in the log; nothing when the log is off."""
    path = os.environ.get("COMPRESS_RSS_LOG")
    if not path:
        return
    if not _state:
        _start(path)
    now, t = _rss(), time.perf_counter()
    with _state["lock"]:
        peak, _state["peak"] = max(_state["peak"], now), now
        secs, _state["t"] = t - _state["t"], t
    line = {"stage": name, "s": round(secs, 2), "at_s": round(t - _state["t0"], 1), "peak_gb": round(peak / 1e9, 3),
            "end_gb": round(now / 1e9, 3), "pid": os.getpid()}
    with open(_state["path"], "a") as f:
        f.write(json.dumps(line) + "\n")
