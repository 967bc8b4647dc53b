"""Report: a run record as a terminal table, report.json, report.md and report.png."""
