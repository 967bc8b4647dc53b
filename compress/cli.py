"""Thin typer app: apply, inspect, analyze, batch, verify, runtime, schema. Errors print one line and exit non-zero (see docs/cli.md)."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from .core.errors import CompressError, InputError, Terminated, hold_after_publish, terminate_like_interrupt

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn pretrained ViT/ResNet checkpoints into smaller, faster, verified models.")


@contextmanager
def _errors(debug: bool):
    terminate_like_interrupt()
    hold_after_publish()  # a signal that lands once OUT is published no longer turns exit 0 into 130/143
    try:
        from .core import envvars

        envvars.check()  # every environment variable read anywhere, checked before any work
        yield
        try:
            sys.stdout.flush()  # a full device or a closed pipe on stdout shows here, inside this handler
        except OSError as e:
            e.stdout = True
            raise
    except CompressError as e:
        if debug:
            raise
        record = getattr(e, "record", None)
        if record is not None:
            from .report.write import terminal_table

            print(terminal_table(record), file=sys.stderr)
        if getattr(e, "plan", None) is not None:  # an unreachable target: the candidates that were measured
            from .planner.search import table
            from .report.write import align

            rows = table(e.plan)[0]
            if len(rows) > 1:  # none measured (nothing came near the target): no empty table
                print(align(rows, left=(0, 1)), file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except (typer.Exit, typer.Abort):
        raise
    except Terminated:
        print("error: terminated; nothing was published", file=sys.stderr)
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        raise typer.Exit(130) from None
    except (MemoryError, RuntimeError) as e:  # out of memory is a size problem, not a bug; anything else is a bug
        if debug:
            raise
        if _disk_problem(e):
            raise typer.Exit(2) from None
        text = str(e)
        if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
            print(f"error: out of memory ({text.strip().splitlines()[0][:120] if text.strip() else 'MemoryError'}); "
                  "lower the input size, calibration.images or distill.batch_size", file=sys.stderr)
            raise typer.Exit(2) from None
        print(f"internal error: {type(e).__name__}: {e}; rerun with --debug for the traceback and report it", file=sys.stderr)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - a bug: one line, and the traceback on request
        if debug:
            raise
        if _disk_problem(e):
            raise typer.Exit(2) from None
        print(f"internal error: {type(e).__name__}: {e}; rerun with --debug for the traceback and report it", file=sys.stderr)
        raise typer.Exit(1) from None


def _disk_problem(e: BaseException) -> bool:
    """A full disk, quota, read-only mount or closed pipe that no writer wrapped (compress/core/diskio.py), stdout's
    included: one line, exit 2 -- the user's to fix, not a bug."""
    import errno
    import os

    from .core.diskio import WORDS, disk_problem, message

    code = disk_problem(e)
    if code is None:
        return False
    # every file write goes through diskio.writing, so a bare OSError without a file name is a print's
    out = getattr(e, "stdout", False) or (isinstance(e, OSError) and e.errno in (errno.EPIPE, errno.ENOSPC)
                                          and e.filename is None)
    if out:  # later flushes of what is still buffered go nowhere, rather than fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write to standard output ({WORDS[code]}); send it to a file system with room or to a "
              "reader that stays open", file=sys.stderr)
    else:
        where = getattr(e, "filename", None)
        print(f"error: {message(code, Path(where).name if where else 'a file', Path(where).parent if where else None)}",
              file=sys.stderr)
    return True


def _overwrite(value: bool) -> object:
    """--overwrite: True; --overwrite=force (see main): "force"."""
    return "force" if value and "--overwrite=force" in _ARGV else value


_ARGV: list = []


@app.command()
def apply(recipe: Path = typer.Argument(..., help="recipe YAML"),
          ckpt: str = typer.Argument(..., help="timm directory, weights file (+ model: in the recipe), or timm:NAME"),
          out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory [./compressed/<name>]"),
          data: Optional[str] = typer.Option(None, "--data", help="images (ImageFolder dir or zip) for calibration and "
                                             "distillation where the recipe names none"),
          device: Optional[str] = typer.Option(None, "--device", help="distillation device: auto, cpu or cuda"),
          resume: bool = typer.Option(False, "--resume", help="continue an interrupted distillation from its checkpoint"),
          override: Optional[str] = typer.Option(None, "--override", help='JSON merged into the recipe, e.g. \'{"report": {"latency": null}}\''),
          dry_run: bool = typer.Option(False, "--dry-run", help="plan and print params/FLOPs; write nothing"),
          overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing output directory that holds "
                                         "a compress result; --overwrite=force: whatever it holds"),
          as_json: bool = typer.Option(False, "--json", help="print the report as JSON on stdout"),
          debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    """Run a recipe on a checkpoint: rewrite, verify, export, measure, report."""
    with _errors(debug):
        from . import api
        from .report.write import terminal_table
        from .run.outdir import resolve_out

        if device not in api.DEVICES:
            raise InputError(f"--device {device!r}: use auto, cpu or cuda")
        r = api.load_recipe(recipe, _json_arg(override, "--override"))
        _init_distributed(device or (r.distill.device if r.distill else "cpu"))
        name = r.name or f"{Path(ckpt.rstrip('/')).stem}-{recipe.stem}"
        out = resolve_out(out or Path("compressed") / name)  # once, first: `-o .`, a symlink, a name too long
        log = (lambda m: print(m, file=sys.stderr)) if as_json else (lambda m: print(m))
        record = api.apply(r, ckpt, out, data=data, dry_run=dry_run, overwrite=_overwrite(overwrite), resume=resume,
                           device=device, inputs=(recipe,), log=log)
        if _rank() != 0:
            return
        if as_json:
            print(json.dumps(record, indent=2))
            return
        print()
        if record.get("plan"):
            from .report.write import align

            print(align([tuple(x) for x in record["plan"]["table"]], left=(0, 1)))
            print(f"plan: {record['plan']['choice'] or 'the teacher as it is'} ({record['plan']['seconds']:.0f} s)\n")
        print(terminal_table(record))
        print()
        if dry_run:
            print("dry run: nothing written")
        else:
            print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")


def _json_arg(text: Optional[str], flag: str) -> Optional[dict]:
    if text is None:
        return None
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys(flag))
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: not valid JSON ({e}); pass an object such as '{{\"report\": {{\"latency\": null}}}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def _unique_keys(flag: str):
    """json's object_pairs_hook: a key given twice is refused, as in YAML files (the last would win silently)."""
    def build(pairs: list) -> dict:
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise InputError(f"{flag}: duplicate key '{k}' in the JSON; the second would silently replace the first: "
                                 "keep one")
            seen.add(k)
        return dict(pairs)
    return build


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _init_distributed(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs. The rendezvous waits
    at most COMPRESS_RENDEZVOUS_TIMEOUT_S (a peer that never comes is one line, exit 2), in a helper thread so
    that SIGTERM/SIGINT still stop the run while it waits (torch waits in C++, where no Python handler runs)."""
    import threading
    from datetime import timedelta

    from .core import envvars

    world = envvars.world()
    if world is None:
        return
    import torch
    import torch.distributed as dist

    gpu = device != "cpu" and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(world["local_rank"])
    timeout = envvars.rendezvous_timeout()
    failed: list = []

    def join():
        try:
            dist.init_process_group("nccl" if gpu else "gloo", timeout=timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - torch's store and gloo raise several types for one cause
            failed.append(e)

    print(f"rendezvous: rank {world['rank']} of {world['world_size']} waiting for the others at {world['master_addr']}:"
          f"{world['master_port']} (at most {timeout:g} s)", file=sys.stderr, flush=True)
    t = threading.Thread(target=join, daemon=True, name="rendezvous")
    t.start()
    while t.is_alive():
        t.join(0.1)  # the main thread stays in Python: a signal's handler runs here
    if failed:
        first = (str(failed[0]).strip().splitlines() or [type(failed[0]).__name__])[0][:200]
        raise InputError(f"rank {world['rank']} of {world['world_size']}: no rendezvous with the other ranks at "
                         f"{world['master_addr']}:{world['master_port']} within {timeout:g} s ({first}); start every "
                         "rank (torchrun does), or raise COMPRESS_RENDEZVOUS_TIMEOUT_S")


@app.command()
def plan(recipe: Path = typer.Argument(..., help="recipe YAML with a target: section"),
         ckpt: str = typer.Argument(..., help="timm directory, weights file (+ model: in the recipe), or timm:NAME"),
         data: Optional[str] = typer.Option(None, "--data", help="calibration images where the recipe names none"),
         out: Optional[Path] = typer.Option(None, "-o", "--out", help="where to write the chosen recipe [./<name>-plan.yaml]"),
         override: Optional[str] = typer.Option(None, "--override", help="JSON merged into the recipe"),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing -o file (never the input recipe)"),
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON on stdout"),
         debug: bool = typer.Option(False, "--debug", help="show tracebacks")):
    """Measure candidate recipes against the recipe's target and write the chosen one as a plain recipe."""
    with _errors(debug):
        from . import api
        from .report.write import align, left_out_text

        r = api.load_recipe(recipe, _json_arg(override, "--override"))
        out = out or Path(f"{r.name or Path(ckpt.rstrip('/')).stem}-plan.yaml")
        log = (lambda m: print(m, file=sys.stderr)) if as_json else print
        kept = api.plan(r, ckpt, out, data=data, overwrite=overwrite, log=log, inputs={"recipe": recipe})
        if as_json:
            print(json.dumps(kept, indent=2, default=str))
            return
        print()
        print(align([tuple(x) for x in kept["table"]], left=(0, 1)))
        if kept["left_out"]:
            print(f"\n{left_out_text(kept['left_out'])}")
        what = "the teacher already meets the target: no passes needed" if kept["met_by_teacher"] else f"chose {kept['choice']}"
        print(f"{what} (planned in {kept['seconds']:.0f} s); wrote {out} (replay it with compress apply {out} {ckpt})")


@app.command()
def inspect(ckpt: str = typer.Argument(..., help="timm directory, weights file, or timm:NAME"),
            recipe: Optional[Path] = typer.Option(None, "--recipe", help="recipe whose model: section describes a weights file"),
            as_json: bool = typer.Option(False, "--json"),
            debug: bool = typer.Option(False, "--debug")):
    """Family, blocks, params, FLOPs, and what each pass would change."""
    with _errors(debug):
        from . import api
        from .run.inspect import format_inspect

        info = api.inspect(ckpt, recipe=recipe)
        print(json.dumps(info, indent=2) if as_json else format_inspect(info))


@app.command()
def analyze(ckpt: str = typer.Argument(..., help="timm directory, weights file, or timm:NAME (a ViT)"),
            data: Optional[str] = typer.Option(None, "--data", help="calibration images (ImageFolder dir or zip); "
                                               "random inputs without it"),
            images: int = typer.Option(128, "--images", min=1, help="calibration images"),
            eps: float = typer.Option(0.5, "--eps", help="coding-rate distortion epsilon"),
            out: Optional[Path] = typer.Option(None, "-o", "--out", help="output directory [./analysis/<name>]"),
            as_json: bool = typer.Option(False, "--json", help="print analysis.json on stdout"),
            debug: bool = typer.Option(False, "--debug")):
    """Per-block influence, skip-KL, coding rate, sparsity and similarity: where a ViT can be cut."""
    with _errors(debug):
        from .measure.analysis import table
        from .report.write import align
        from .run.analyze import run

        if not 0 < eps < float("inf"):
            raise InputError(f"--eps {eps}: use a positive number, e.g. --eps 0.5")
        out = out or Path("analysis") / Path(ckpt.rstrip("/")).stem
        result = run(ckpt, data, images, eps, out)
        if as_json:
            print(json.dumps(result, indent=2))
            return
        print(f"{result['calibration']}; {result['tokens']} tokens; coding-rate eps {result['eps']:g}")
        print(align(table(result)))
        print(f"\nMLP least important first (skip-KL): {result['mlp_rank']}; greedy removal order: "
              + ", ".join(f"{g['block']} (KL {g['kl']:.4f})" for g in result["greedy_mlp"]))
        print(f"attention least important first (skip-KL): {result['attn_rank']}")
        print(f"wrote {out}/analysis.json, analysis.png")


@app.command()
def batch(zoo: list[Path] = typer.Argument(..., help="zoo YAML: version, entries (checkpoint, recipe, name, overrides); "
                                           "with --merge: the shard output folders"),
          out: Path = typer.Option(Path("compressed/batch"), "-o", "--out", help="output directory"),
          jobs: int = typer.Option(1, "--jobs", min=1, help="entries converted at once, each in its own process"),
          resume: bool = typer.Option(False, "--resume", help="skip entries done and verified; retry the rest"),
          shard: Optional[str] = typer.Option(None, "--shard", help="i/n: run only shard i (0 <= i < n) of the "
                                              "zoo's entries, assigned by a hash of the entry name"),
          merge: bool = typer.Option(False, "--merge", help="join the outputs of --shard runs (the arguments) into -o"),
          debug: bool = typer.Option(False, "--debug")):
    """Convert every entry of a model zoo; a failing entry never stops the others."""
    with _errors(debug):
        from .report.write import align
        from .run.batch import PARTIAL_FAILURE, parse_shard, run_batch, summary_rows

        if merge:
            from .run.batch_merge import merge as join

            if shard is not None:
                raise InputError("--merge joins finished shards; drop --shard")
            summary = join(zoo, out)
        else:
            if len(zoo) != 1:
                raise InputError(f"batch takes one zoo file, got {len(zoo)} paths; to join shard outputs add --merge")
            from .run.outdir import resolve_out

            summary = run_batch(zoo[0], resolve_out(out), entry=main, jobs=jobs, resume=resume, shard=parse_shard(shard) if shard else None)
        print()
        print(align(summary_rows(summary), left=(0, 6)))
        failed = [n for n, e in summary["entries"].items() if e["state"] != "done"]
        print(f"\nwrote {out}/summary.md, summary.json, manifest.json")
        if failed:
            print(f"error: {len(failed)} of {len(summary['entries'])} entries failed: {', '.join(failed)}", file=sys.stderr)
            raise typer.Exit(PARTIAL_FAILURE)


runtime_app = typer.Typer(no_args_is_help=True, help="older onnxruntime releases that exported files are also run on")
app.add_typer(runtime_app, name="runtime")


@runtime_app.command("prepare")
def runtime_prepare(version: str = typer.Argument("1.16", help="an export.min_runtime value, e.g. 1.16"),
                    debug: bool = typer.Option(False, "--debug")):
    """Install that onnxruntime into the cache ($COMPRESS_CACHE or ~/.cache/compress) while online (`make setup` does
    it for 1.16). The only command that downloads: `apply` finds it prepared or stops, naming this command."""
    with _errors(debug):
        from .export.runtimes import RUNTIMES, prepare

        if version not in RUNTIMES:
            raise InputError(f"no min_runtime '{version}'; choose one of {', '.join(RUNTIMES)}")
        old = prepare(version)
        print(f"onnxruntime {old.version} ready: {old.python}")


@app.command()
def verify(out: Path = typer.Argument(..., help="a directory written by compress apply"),
           images: int = typer.Option(8, "--images", min=1, help="inputs for the ONNX vs safetensors comparison"),
           debug: bool = typer.Option(False, "--debug")):
    """Re-check a result: file hashes against report.json, model.onnx against the rebuilt safetensors (exit 0 / 3)."""
    with _errors(debug):
        from .api import verify as run

        checked = run(out, images)
        par = checked.get("parity")
        print(f"ok: {checked['hashes']} files match their sha256"
              + (f"; model.onnx matches model.safetensors within {par['rel_diff']:.1e} of the logit scale on {par['inputs']}"
                 if par else ""))


@app.command()
def schema():
    """Print the recipe JSON Schema (for editor validation)."""
    from .recipe import json_schema

    print(json.dumps(json_schema(), indent=2))


def main():
    # No fixed glibc mmap threshold here: a 1 MiB one (to hand freed tensors back) made every larger tensor a fresh
    # zero-filled mapping; ViT-L converted in 150 s, 66 s of it system time, against 126 s without, at the same
    # peak (3.48 vs 3.54 GB): limits.release() trims the heap between stages instead
    # typer has no option with an optional value: --overwrite=force is read as the flag, then told apart here
    _ARGV[:] = sys.argv[1:]
    sys.argv[1:] = ["--overwrite" if a == "--overwrite=force" else a for a in sys.argv[1:]]
    sys.exit(_run_app())


def _run_app() -> int:
    """The app with click's own exits taken over, so that every command (help and schema included) ends the same
    way: a usage error is one `error:` line (exit 2), not a box; stdout that cannot be written (a full disk,
    /dev/full, a closed pipe) is one line, exit 2, not a traceback."""
    try:
        from typer._click import exceptions as cx  # typer >= 0.2x carries its own click
    except ImportError:
        from click import exceptions as cx

    import rich.console

    def broken_pipe(console):  # rich's own handler exits 1 in silence; as an OSError, typer's and ours below see it
        import errno

        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    rich.console.Console.on_broken_pipe = broken_pipe
    try:
        try:
            code = app(standalone_mode=False, prog_name="compress")
        finally:
            sys.stdout.flush()
    except cx.NoArgsIsHelpError as e:  # `compress` alone: its help, as before (exit 2)
        print(e.format_message(), file=sys.stderr)
        return 2
    except cx.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "compress"
        print(f"error: {e.format_message().rstrip('.')}; see `{cmd} --help`", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    except cx.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except OSError as e:
        if not _disk_problem(e):
            raise
        return 2
    except SystemExit as e:  # typer ends a closed stdout pipe itself (exit 1, silent) after wrapping stdout
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            import errno

            _disk_problem(BrokenPipeError(errno.EPIPE, "Broken pipe"))
            return 2
        raise
    return code if isinstance(code, int) else 0
