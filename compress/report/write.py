"""Formats a run record into the terminal table, report.json, report.md and report.png. No logic."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from ..measure.accuracy import gate_basis


def machine_info(threads: int | None) -> dict:
    import numpy
    import onnx
    import onnxruntime
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ort_threads": threads, "torch_threads": __import__("torch").get_num_threads(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": numpy.__version__, "load_average": [round(x, 2) for x in os.getloadavg()]}


def _num(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _bytes(n) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def rows(record: dict) -> list[tuple[str, str, str, str]]:
    """(metric, teacher, student, change) rows shared by the terminal and Markdown tables."""
    s = record["summary"]
    out = []

    def ratio(d, fmt):
        change = f"{100 * (d['ratio'] - 1):+.1f}%" if d["ratio"] is not None else "-"
        return fmt(d["teacher"]), fmt(d["student"]), change

    out.append(("params", *ratio(s["params"], _num)))
    out.append(("FLOPs / image", *ratio(s["flops"], _num)))
    for key, label in (("safetensors_bytes", "safetensors size"), ("onnx_bytes", "ONNX size")):
        if key in s:
            out.append((label, *ratio(s[key], _bytes)))
    for bs, d in s.get("latency", {}).items():
        for q in ("p50_ms", "p90_ms"):
            out.append((f"ORT latency b{bs} {q[:3]}", f"{d['teacher'][q]:.2f} ms", f"{d['student'][q]:.2f} ms",
                        f"{d['teacher'][q] / d['student'][q]:.2f}x speedup" if q == "p50_ms" else ""))
    ev = s.get("eval")
    if ev and ev.get("images"):
        if "teacher_top1" in ev:
            iv = ev.get("intervals", {})
            out.append((f"top-1 ({ev['images']} images)", _top1(ev["teacher_top1"], iv.get("teacher")),
                        _top1(ev["student_top1"], iv.get("student")),
                        f"{100 * (ev['student_top1'] - ev['teacher_top1']):+.2f} pts" + _change(iv.get("student"))))
        out.append((f"agreement with teacher ({ev['images']} images)", "", f"{100 * ev['agreement']:.2f}%", ""))
    return out


def _top1(top1: float, iv: dict | None) -> str:
    """A top-1 with its 95% interval when the record has one: "83.80% (81.4-86.1)"."""
    t = iv and iv.get("top1")
    return f"{100 * top1:.2f}%" + (f" ({100 * t['lo']:.1f}-{100 * t['hi']:.1f})" if t else "")


def _change(iv: dict | None) -> str:
    """The paired 95% interval of a change in top-1 (points; the drop's interval negated)."""
    d = iv and iv.get("drop")
    return f" ({-d['hi']:+.2f} to {-d['lo']:+.2f})" if d else ""


def int8_control(rec: dict) -> str:
    """The accuracy control in one line for the report: the bound and where it came from, the calibration, what
    stayed float and why, the file's distance against the bound (and QAT's, when it ran)."""
    metric = rec.get("metric", "kl")
    methods = ", ".join(f"{m} {v:.3g}" for m, v in rec["methods_kl"].items())
    kept = "; ".join(f"{k['node']} ({k['op']}, KL {k['kl_alone']:.3g} when only it is int8)" for k in rec["kept_float"])
    ptq = f"file {metric} {rec[metric]:.3g} {'<=' if rec['meets'] else '> (bound not met)'} {rec['bound']:.3g}"
    if metric == "disagreement":
        ptq += f" (KL {rec['kl']:.3g})"
    qat = rec.get("qat")

    def far(r: dict) -> str:
        return (f"{metric} {r[metric]:.3g}" + (f", KL {r['kl']:.3g}" if metric != "kl" else "")
                + f", {r['kept_float']} float")

    used = (f"; used: {qat['used']} (before: ptq {far(qat['before'])}; after {qat['steps']} QAT steps: "
            f"{far(qat['after'])})" if qat and "after" in qat else
            f"; used: ptq ({qat['why']})" if qat else "; used: ptq")
    return (f"bound {metric} <= {rec['bound']:.3g} from {rec.get('source', 'export.int8_max_kl')}; "
            f"calibration {rec['method']} (KL to fp32 on {rec['held_out_images']} held-out images: {methods}); "
            + (f"kept float: {kept} (the most sensitive first, until the file was within the bound); " if kept
               else "no layer kept float; ") + ptq + used)


def variant_rows(record: dict) -> list[tuple]:
    """One row per ONNX file of the student (fp32 first): size, parity, p50 latency per batch, top-1, agreement,
    the oldest onnxruntime it was run on."""
    s, arts = record["summary"], record.get("artifacts", {})
    ev = s.get("eval") or {}
    out = []
    for key, a in arts.items():
        if not key.startswith("onnx"):
            continue
        v = key.partition(".")[2] or "fp32"
        name = "student" if v == "fp32" else v
        lat = [(bs, d["student"] if v == "fp32" else d["variants"][v]) for bs, d in s.get("latency", {}).items()]
        acc = ev if v == "fp32" else (ev.get("variants") or {}).get(v, {})
        top1 = acc.get("student_top1", acc.get("top1"))
        iv = (ev.get("intervals") or {}).get("student" if v == "fp32" else v)
        p = a["parity"]
        check = f"max rel Δ {p['rel_diff']:.1e}, agree {100 * p['agreement']:.1f}%"
        out.append((v, " + ".join(a.get("files", [a["path"]])), _bytes(a["bytes"]), check,
                    "  ".join(f"b{bs} {d['p50_ms']:.2f} ms" for bs, d in lat) or "-",
                    _top1(top1, iv) + _change(iv) if top1 is not None else "-",
                    f"{100 * acc['agreement']:.2f}%" if "agreement" in acc else "-", name, a.get("oldest_runtime", "-")))
    return out


def align(r: list[tuple], left: tuple[int, ...] = (0,)) -> str:
    """A plain-text table: columns in `left` are left-justified, the others right-justified."""
    w = [max(len(x[i]) for x in r) for i in range(len(r[0]))]
    lines = ["  ".join(c.ljust(w[i]) if i in left else c.rjust(w[i]) for i, c in enumerate(x)).rstrip() for x in r]
    lines.insert(1, "-" * max(len(x) for x in lines))
    return "\n".join(lines)


def terminal_table(record: dict) -> str:
    text = align([("", "teacher", "student", "change"), *rows(record)])
    v = variant_rows(record)
    if len(v) > 1:
        text += "\n\n" + align([("ONNX variant", "size", "p50 latency", "top-1", "agreement", "oldest ORT run on"),
                                   *[(x[0], x[2], x[4], x[5], x[6], x[8]) for x in v]])
    return text


RANDOM = "on random inputs, not a fidelity figure"


def _ledger_md(record: dict) -> list[str]:
    out = ["| # | pass | exact | params | FLOPs | check | what changed |", "|---|---|---|---|---|---|---|"]
    for i, e in enumerate(record["passes"]):
        if "skipped" in e:
            out.append(f"| {i} | {e['pass']} | | | | skipped | {e['skipped']} |")
            continue
        if e["exact"]:
            check = f"exact: max rel Δlogit {e['verified']['rel_diff']:.1e} (tol {e['verified']['tolerance']:.0e})"
        else:
            check = f"approx: agreement {100 * e['vs_teacher']['agreement']:.1f}%, KL {e['vs_teacher']['kl']:.3g}"
            if record.get("calibration_random"):
                check += f" {RANDOM}"
        out.append(f"| {i} | {e['pass']} | {'yes' if e['exact'] else 'no'} | {_num(e['params'][0])} → {_num(e['params'][1])} "
                   f"| {_num(e['flops'][0])} → {_num(e['flops'][1])} | {check} | {'; '.join(e['changes'])} |")
    return out


def _notes(record: dict) -> list[str]:
    """What was read and repaired, and anything the run had to work around (fixed-batch export, class count)."""
    src, onnx = record["source"], record.get("artifacts", {}).get("onnx", {})
    summary = record.get("summary", {})
    return [n for n in (src.get("read"), src.get("note"), src.get("preprocess_note"), onnx.get("fixed_batch"),
                        onnx.get("traced_batch_baked") and f"exported with the dynamo exporter: {onnx['traced_batch_baked']} "
                        "with the traced graph", summary.get("latency_note"), summary.get("eval", {}).get("labels"),
                        summary.get("eval", {}).get("warning")) if n]


def _runs_md(a: dict) -> str:
    """The onnxruntime releases the file was run on, each held to the file's bar (or why one was skipped)."""
    runs = a.get("runtimes") or []
    done = [r["onnxruntime"] + (f" (isolated: {r['rel_diff']:.1e} of logit scale, top-1 agreement "
                                f"{100 * r['agreement']:.1f}%)" if r.get("isolated") else "") for r in runs if "skipped" not in r]
    text = f"; run on onnxruntime {', '.join(done)}" if done else ""
    return text + "".join(f"; **not run on onnxruntime {r['onnxruntime']}**: {r['skipped']}" for r in runs if "skipped" in r)


def left_out_text(n: int) -> str:
    """The sentence under the table on the candidates it does not show; '' when it shows them all."""
    if n == 0:
        return ""
    return (f"{n} more candidate{' was' if n == 1 else 's were'} beyond reach on FLOPs/params or not timed once one "
            "met the target")


def plan_md(plan: dict) -> list[str]:
    """The planner's candidate table (compress plan / apply with target:) as Markdown."""
    head, *body = plan["table"]
    out = ["## Plan", "", f"Target {json.dumps({k: v for k, v in plan['target'].items() if v is not None})}; "
           f"planned in {plan['seconds']:.0f} s. "
           + ("The teacher already meets it: no passes needed." if plan["met_by_teacher"] else f"Chosen: **{plan['choice']}** (*).")
           + (f" {left_out_text(plan['left_out'])}." if plan["left_out"] else ""),
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in body]
    for i, a in enumerate(plan.get("attempts", [])):
        out.append(f"\nAttempt {i + 1}: {a['candidate']}: {a['result']}.")
    return out


def markdown(record: dict) -> str:
    src, m = record["source"], record["machine"]
    lines = [f"# compress report: {src['path']}", "",
             f"Source `{src['arch']}` ({src['adapter']}), input {record['input_size']}, created {record['created']} "
             f"by compress {record['compress_version']}. Every figure below was measured in this run.", "",
             "| metric | teacher | student | change |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(record)]
    notes = _notes(record)
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    if record.get("plan"):
        lines += ["", *plan_md(record["plan"])]
    lines += ["", "## Passes", "", f"Calibration: {record['calibration']}.", "", *_ledger_md(record)]
    d = record.get("distill")
    if d:
        b, a = d["calib_before"], d["calib_after"]
        notes = ["bf16 autocast" if d["amp_bf16"] else "", f"resumed from step {d['resumed_from']}" if d["resumed_from"] else "",
                 f"{d['skipped_images']} unreadable images skipped" if d["skipped_images"] else ""]
        notes = "; ".join(n for n in notes if n)
        lines += ["", "## Distillation", "",
                  f"{d['steps']} steps of {d['batch_size']} images from `{d['data']}` ({d['images']} images) on "
                  f"{d['device']} x{d['world_size']}: {d['seconds']:.1f} s, {d['images_per_s']:.0f} images/s, "
                  f"final loss {d['final_loss']:.4f}{f' ({notes})' if notes else ''}.",
                  f"Teacher agreement on the calibration batch{f' ({RANDOM})' if record.get('calibration_random') else ''}: "
                  f"{100 * b['agreement']:.1f}% before, {100 * a['agreement']:.1f}% after (KL {b['kl']:.3g} -> {a['kl']:.3g})."]
    if record.get("learned"):
        lines += ["", "## Learned pass parameters", "", "Values the passes left to training, as exported"
                  + (" (after distillation)." if d else " (no distillation: still their start values)."), "",
                  "| module | values |", "|---|---|"]
        lines += [f"| `{k}` | {', '.join(f'{n} {x:.4g}' for n, x in v.items())} |" for k, v in record["learned"].items()]
    if record.get("gates"):
        lines += ["", "## Gates", "", "| gate | target | measured | result |", "|---|---|---|---|"]
        lines += [f"| {g['gate']} | {g['target']} | {g['measured']:.4g}{gate_basis(g)} | {'pass' if g['ok'] else '**FAIL**'} |"
                  for g in record["gates"]]
    v = variant_rows(record)
    if len(v) > 1:
        lines += ["", "## ONNX variants", "", "Each checked against the PyTorch student on the calibration batch before it was "
                  "written; latency from the same interleaved runs as above; top-1 and teacher agreement on the eval data.", "",
                  "| variant | file | size | parity vs PyTorch | p50 latency | top-1 | agreement | oldest onnxruntime run on |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x[0]} | `{x[1]}` | {x[2]} | {x[3]} | {x[4]} | {x[5]} | {x[6]} | {x[8]} |" for x in v]
    lines += ["", "## Artifacts", ""]
    for kind, a in record.get("artifacts", {}).items():
        extra = ""
        if "parity" in a:
            p = a["parity"]
            bar = f"tol {p['tolerance']:.0e}" if p.get("tolerance") else f"needs {100 * p['min_agreement']:.0f}% agreement"
            slim = a.get("slim") or {}
            extra = (f"; onnxruntime vs PyTorch on {p['images']} inputs: max |Δ| {p['max_abs_diff']:.2e} "
                     f"({p['rel_diff']:.1e} of logit scale, {bar}), top-1 agreement {100 * p['agreement']:.1f}%; "
                     f"{a['nodes']} nodes"
                     + (f" (onnxslim: {slim['nodes_before']} before)" if slim.get("applied") else
                        f" (onnxslim not applied: {slim['why']})" if slim else "")
                     + f"; operators: {', '.join(a['operators'])}" + _runs_md(a)
                     + (f"; int8 accuracy control: {int8_control(a['accuracy_control'])}" if a.get("accuracy_control") else "")
                     + (f"; **{a['note']}**" if a.get("note") else ""))
        lines.append(f"- `{' + '.join(a.get('files', [a['path']]))}`: {_bytes(a['bytes'])}{extra}")
    lay = record.get("family_layout")
    if lay:  # the checkpoint's own family layout (Hugging Face directory, torchvision state dict)
        lines.append(f"- {lay['format']} layout: not written, {lay['skipped']}" if "skipped" in lay else
                     f"- `{lay['path']}`: {lay['format']} layout, reloaded by that library and compared with the student "
                     f"({lay['parity']['rel_diff']:.1e} of logit scale)")
    lines += ["", "## Machine", "", f"{m['cpu']}, {m['cores']} cores; onnxruntime {m['onnxruntime']} with "
              f"{m['ort_threads'] or '-'} intra-op threads (latency: warm-up, then teacher and student interleaved); "
              f"torch {m['torch']}, timm {m['timm']}, onnx {m['onnx']}, Python {m['python']}, {m['os']}"
              + (f"; load average {'/'.join(map(str, m['load_average']))} (1/5/15 min) when the run ended" if m.get("load_average") else "")
              + ".", "",
              "Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in record["stages_s"].items()) + "."]
    return "\n".join(lines) + "\n"


def chart(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["summary"]
    items = [("params", s["params"]), ("FLOPs", s["flops"])]
    items += [(lbl, s[k]) for k, lbl in (("onnx_bytes", "ONNX bytes"), ("safetensors_bytes", "safetensors bytes")) if k in s]
    items += [(f"latency b{bs}", {"ratio": d["student"]["p50_ms"] / d["teacher"]["p50_ms"]}) for bs, d in s.get("latency", {}).items()]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(items)))
    names, vals = [n for n, _ in items][::-1], [100 * d["ratio"] for _, d in items][::-1]
    ax.barh(names, vals, color="#4878a8")
    ax.axvline(100, color="k", lw=0.8)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.0f}%", va="center", fontsize=8)
    ax.set_xlabel("student as % of teacher (measured in this run)")
    ax.set_title(f"compress: {Path(record['source']['path']).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(record: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(record, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(record))
    chart(record, folder / "report.png")
