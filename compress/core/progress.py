"""Progress for a terminal (tqdm) or a log file (a plain line every few seconds: a captured log
of tqdm's carriage-return redraws is one ever-growing line)."""
from __future__ import annotations

import datetime as dt
import os
import sys
import time

from tqdm import tqdm


def interval_s() -> float:
    """The plain-line period when stderr is not a TTY; read per run (a forked or embedding process may set it late)."""
    return float(os.environ.get("COMPRESS_PROGRESS_S", "5"))


class PlainProgress:
    """The slice of tqdm's interface the training loop uses, printing `desc: step i/n, ..., ETA` lines."""

    def __init__(self, total: int, initial: int, desc: str, file, interval: float):
        self.total, self.n, self.desc, self.file, self.interval = total, initial, desc, file, interval
        self.start, self.t0, self.last, self.postfix = initial, time.perf_counter(), time.perf_counter(), {}
        self.closed, self.printed = False, None  # printed: the step of the last line written

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._line()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = values

    def _line(self) -> None:
        self.last = now = time.perf_counter()
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        eta = dt.timedelta(seconds=round((self.total - self.n) / rate)) if rate > 0 else "?"
        extra = "".join(f", {k.replace('img_s', 'images/s')} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: step {self.n}/{self.total}{extra}, ETA {eta}", file=self.file, flush=True)
        self.printed = self.n

    def close(self) -> None:
        if self.n > self.start and not self.closed and self.printed != self.n:
            self._line()  # the last step reached, always, and once
        self.closed = True


def progress(total: int, initial: int, desc: str, disable: bool, file=sys.stderr):
    """tqdm on a terminal; plain periodic lines otherwise (pipelines, batch jobs, schedulers)."""
    if not disable and not file.isatty():
        return PlainProgress(total, initial, desc, file, interval_s())
    return tqdm(total=total, initial=initial, disable=disable, desc=desc, unit="step", file=file,
                mininterval=2.0, dynamic_ncols=True)
