"""The planner's show runs: `compress plan` at speedup 1.3 / 2.0 (batch 8) on each shared teacher, and
`compress apply` of the shipped target recipes (speedup 1.5 at batch 8, at most 1 point of top-1 lost on 2,000
test images, 600 distillation steps), whose reports carry the 1.5 plan table. Each run is a child process, as
a user runs it; the seconds are the planner's own and the wall clock around the child.

    python -m benchmarks.plans [--speedups 1.3,2.0] [--no-apply] [--out benchmarks/results/plans]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from benchmarks import child_env
from compress.report.write import machine_info

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT.parent / "shared" / "data" / "models"
RECIPES = {"vit_cifar10": ROOT / "recipes" / "plan_speedup15_vit.yaml",
           "resnet26_cifar10": ROOT / "recipes" / "plan_speedup15_resnet.yaml"}


def _child(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, env=child_env())
    return proc, time.perf_counter() - t0


def _fail(proc) -> dict:
    """Exit 4 prints the measured candidates (or the run's table) before its one-line error: keep both."""
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    tail = [x for x in lines[-60:-1] if not x.startswith(("plan:", "distill:", "load:", "width:", "lowrank:", "rewrite"))]
    return {"exit_code": proc.returncode, "error": lines[-1] if lines else "", "stderr_tail": tail}


def _plan_log(proc) -> list[str]:
    """The planner's own lines, each ending with the seconds since planning began: where its time went."""
    return [x for x in proc.stderr.splitlines() if x.startswith("plan:")]


def plan_run(teacher: str, speedup: float, tmp: Path) -> dict:
    override = json.dumps({"target": {"speedup": speedup}})
    proc, wall = _child(["plan", str(RECIPES[teacher]), str(MODELS / teacher), "--override", override, "--json",
                         "-o", str(tmp / f"{teacher}-{speedup}.yaml")])
    out = {"teacher": teacher, "speedup": speedup, "wall_s": round(wall, 1), "plan_log": _plan_log(proc)}
    if proc.returncode != 0:  # exit 4: no candidate meets the target (the line names the best found)
        return {**out, **_fail(proc)}
    got = json.loads(proc.stdout)
    return {**out, "exit_code": 0, **{k: got[k] for k in ("choice", "seconds", "table", "left_out", "met_by_teacher")}}


def apply_run(teacher: str, tmp: Path) -> dict:
    proc, wall = _child(["apply", str(RECIPES[teacher]), str(MODELS / teacher), "-o", str(tmp / teacher), "--json"])
    out = {"teacher": teacher, "recipe": str(RECIPES[teacher].relative_to(ROOT)), "wall_s": round(wall, 1),
           "plan_log": _plan_log(proc)}
    if proc.returncode != 0:
        return {**out, **_fail(proc)}
    rep = json.loads(proc.stdout)
    s, p = rep["summary"], rep["plan"]
    ev = s.get("eval", {})
    return {**out, "exit_code": 0, "choice": p["choice"], "plan_seconds": p["seconds"], "table": p["table"],
            "left_out": p["left_out"], "attempts": p.get("attempts"), "stages_s": rep["stages_s"],
            "flops_ratio": s["flops"]["ratio"], "speedup": {b: v["speedup"] for b, v in s["latency"].items()},
            "teacher_top1": ev.get("teacher_top1"), "student_top1": ev.get("student_top1"),
            "agreement": ev.get("agreement"), "images": ev.get("images"), "gates": rep.get("gates")}


def _table(rows: list[list]) -> list[str]:
    head, *body = rows
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(map(str, r)) + " |" for r in body]


def _relative(line: str) -> str:
    """A logged line with this checkout's absolute paths made relative to it (../shared/... for the shared data), so
    the Markdown names no machine."""
    return line.replace(f"{ROOT}/", "").replace(f"{ROOT.parent}/", "../")


def markdown(res: dict) -> str:
    lines = ["## The planner: `compress plan` and `compress apply` with a `target:` (`python -m benchmarks.plans`)", "",
             f"{res['machine']}; onnxruntime {res['onnxruntime']}, torch {res['torch']}, 2 threads; load average "
             f"{res['load_at_start']} at the start, {res['load_at_end']} at the end; {res['total_s']:.0f} s in all. "
             "Candidates are scored by KL to the teacher on 128 held-out training images after a rewrite fitted to 128 "
             "others, and timed as the file that would ship, interleaved with the teacher (p50). Seconds = the "
             "planner's own clock; wall = the child process.", ""]
    for r in res["applies"]:
        lines += [f"### `compress apply {r['recipe']}` on {r['teacher']}", ""]
        if r["exit_code"] != 0:
            lines += [f"exit {r['exit_code']}: `{_relative(r['error'])}` (wall {r['wall_s']:.0f} s)", "", "```text",
                      *map(_relative, r.get("stderr_tail", [])), "```", ""]
            continue
        drop = 100 * (r["teacher_top1"] - r["student_top1"])
        share = r["plan_seconds"] / r["stages_s"]["distill"] if r["stages_s"].get("distill") else None
        lines += [f"Chose **{r['choice']}**, planned in {r['plan_seconds']:.0f} s"
                  + (f" ({share:.0%} of the distillation's {r['stages_s']['distill']:.0f} s)" if share else "")
                  + "; the report's own measurements: "
                  f"speedup {r['speedup'].get('8', 0):.2f}× at batch 8 ({r['speedup'].get('1', 0):.2f}× at batch 1), "
                  f"FLOPs {r['flops_ratio']:.1%}, top-1 {100 * r['student_top1']:.1f}% vs the teacher's "
                  f"{100 * r['teacher_top1']:.1f}% (drop {drop:.1f} points) and agreement {100 * r['agreement']:.1f}% on "
                  f"{r['images']} test images; stages {json.dumps(r['stages_s'])}; wall {r['wall_s']:.0f} s.", ""]
        lines += _table(r["table"]) + ["", f"({r['left_out']} more candidates beyond reach on FLOPs or not timed.)", ""]
    for r in res["plans"]:
        lines += [f"### `compress plan` on {r['teacher']}, speedup {r['speedup']} at batch 8", ""]
        if r["exit_code"] != 0:
            lines += [f"exit {r['exit_code']}: `{_relative(r['error'])}` (wall {r['wall_s']:.0f} s)", "", "```text",
                      *map(_relative, r.get("stderr_tail", [])), "```", ""]
            continue
        what = "the teacher already meets it" if r["met_by_teacher"] else f"chose **{r['choice']}**"
        distill = next((a["stages_s"]["distill"] for a in res["applies"] if a["teacher"] == r["teacher"]
                        and a.get("stages_s", {}).get("distill")), None)
        share = f", {r['seconds'] / distill:.0%} of that teacher's {distill:.0f} s distillation above" if distill else ""
        lines += [f"{what}; planned in {r['seconds']:.0f} s (wall {r['wall_s']:.0f} s{share}).", ""]
        lines += _table(r["table"]) + ["", f"({r['left_out']} more candidates beyond reach on FLOPs or not timed.)", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speedups", default="1.3,2.0")
    ap.add_argument("--apply", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--teachers", default=",".join(RECIPES))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plans")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    m = machine_info(2)
    res = {"machine": f"{m['cpu']}, {m['cores']} cores, {m['os']}",
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
           "load_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()), "applies": [], "plans": [],
           "command": "python -m benchmarks.plans " + " ".join(argv if argv is not None else sys.argv[1:])}
    teachers = args.teachers.split(",")
    with tempfile.TemporaryDirectory(prefix="compress-plans-") as tmp:
        for t in teachers:
            if args.apply:
                print(f"{t}: compress apply {RECIPES[t].name}", file=sys.stderr)
                res["applies"].append(apply_run(t, Path(tmp)))
                print(json.dumps({k: v for k, v in res["applies"][-1].items() if k != "table"}), file=sys.stderr)
            for s in (float(x) for x in args.speedups.split(",") if x):
                print(f"{t}: compress plan, speedup {s}", file=sys.stderr)
                res["plans"].append(plan_run(t, s, Path(tmp)))
                print(json.dumps({k: v for k, v in res["plans"][-1].items() if k != "table"}), file=sys.stderr)
    res["total_s"] = time.perf_counter() - t0
    res["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plans.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "plans.md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
