"""`python -m benchmarks.coverage`: the table's arithmetic, and the --quick subset (one per family) through the real CLI."""
from __future__ import annotations

import json

import pytest

from benchmarks import child_env
from benchmarks.coverage import CASES, TIMEOUT_S, main, ok, render, summarise
from tests import forkcli
from tests.conftest import REPO


def _row(label, family, cells, **kw):
    return {"label": label, "family": family, "class": "X", "pending": None, "cells": cells, **kw}


def test_summary_counts_a_rewrite_only_within_the_budget_and_shows_each_failure():
    rows = [_row("a", "vit", {"export": {"rc": 0, "flops": 1.0}, "width": {"rc": 0, "flops": 0.49},
                              "lowrank": {"rc": 2, "error": "error: no | layers"}}),
            _row("b", "resnet", {"export": {"rc": 0, "flops": 1.0}, "width": {"rc": 0, "flops": 0.6},  # ran, missed it
                                 "lowrank": {"rc": 1, "error": "internal error: boom"}}),
            _row("c", "vit", {}, build_error="TypeError: no such arg")]
    s = summarise(rows)
    assert s == {"architectures": 3, "built": 2, "export_ok": 2, "width_or_lowrank_ok": 1, "family_entries": 2,
                 "flops_target_ok": None, "exit_1_or_3": 1, "pending": 0}  # no flops recipe ran: not a 0
    md = render(rows, {"summary": s, "date": "d", "commit": "c", "machine": "m", "minutes": 1.0},
                ["export", "width", "lowrank"])
    assert "| a | X | ✔ 1.000 | ✔ 0.490 | exit 2: error: no / layers |" in md  # a '|' in the line would split the cell
    assert "flops: 0.5}`: not run" in md and "⚠ 0.600" in md and "exit 1: internal error: boom" in md and "not built: TypeError" in md


def test_the_harness_covers_forty_architectures_and_each_family_in_quick():
    assert len(CASES) >= 40 and len({(c.source, c.name) for c in CASES}) == len(CASES)
    quick = [c for c in CASES if c.quick]
    assert {c.source for c in quick} == {"timm", "torchvision", "hf"} and {c.family for c in quick} == {"vit", "resnet"}


@pytest.mark.slow
def test_coverage_quick_converts_one_model_per_family(tmp_path):
    def cli(args):  # the real CLI in a child process, forked from one that has imported compress already
        return forkcli.run(args, REPO, child_env(), timeout=TIMEOUT_S)

    # export and width (the pass this harness tracks); lowrank on these families has tests of its own
    assert main(["--quick", "--recipes", "export,width", "--out", str(tmp_path)], cli=cli) == 0
    data = json.loads((tmp_path / "coverage.json").read_text())
    assert len(data["rows"]) == sum(c.quick for c in CASES) and not data["complete"]
    for row in data["rows"]:
        assert "build_error" not in row, row
        assert row["cells"]["export"]["rc"] == 0, row
        assert row["cells"]["export"]["flops"] == pytest.approx(1.0)
        assert all(c["rc"] in (0, 2) for c in row["cells"].values()), row  # never a crash or a failed verification
        assert ok(row["cells"]["width"], True), row  # within 2% of the 0.5 budget
    md = (tmp_path / "COVERAGE.md").read_text()
    assert all(row["label"] in md for row in data["rows"])
