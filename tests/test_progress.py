"""Progress in a log file: plain periodic lines (step, images/s, loss, ETA), no carriage returns."""
from __future__ import annotations

import io

from compress.core.progress import PlainProgress, progress


def test_not_a_tty_gives_plain_lines_with_step_rate_loss_and_eta():
    err = io.StringIO()  # what a pipeline's captured stderr is: not a TTY
    bar = progress(10, 2, "distill", disable=False, file=err)
    assert isinstance(bar, PlainProgress)
    bar.interval = 0.0  # a line at every step instead of every few seconds
    for i in range(8):
        bar.set_postfix(loss=f"{1 / (i + 1):.4f}", img_s="64", refresh=False)
        bar.update(1)
    bar.close()
    text = err.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 8  # one line a step: closing adds none where the last step has one
    assert lines[0].startswith("distill: step 3/10, loss 1.0000, images/s 64, ETA ")
    assert lines[-1].startswith("distill: step 10/10, loss 0.1250") and lines[-1].endswith("ETA 0:00:00")


def test_lines_are_periodic_not_per_step():
    err = io.StringIO()
    bar = progress(1000, 0, "distill", disable=False, file=err)
    bar.interval = 3600.0
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert err.getvalue().splitlines() == [err.getvalue().splitlines()[-1]]  # only the final line
    assert err.getvalue().startswith("distill: step 1000/1000")


def test_disabled_writes_nothing():
    err = io.StringIO()
    bar = progress(5, 0, "distill", disable=True, file=err)
    bar.update(1)
    bar.close()
    assert err.getvalue() == ""
