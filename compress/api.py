"""The public Python API: what the CLI's commands do, as functions (docs/python-api.md).

The CLI calls these, so a notebook and a shell run one code path and fail the same way: every bad input raises a
CompressError subclass whose message is the line the CLI prints after `error:` and whose `exit_code` is the CLI's
(InputError 2, VerificationError 3, GateError and TargetError 4).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Union

from .core.errors import CompressError, GateError, InputError, TargetError, VerificationError
from .recipe import Recipe

__all__ = ["apply", "plan", "inspect", "verify", "load_compressed", "load_recipe", "Recipe", "CompressError",
           "InputError", "VerificationError", "GateError", "TargetError"]

RecipeLike = Union[Recipe, dict, str, Path]
DEVICES = (None, "auto", "cpu", "cuda")


def load_recipe(recipe: RecipeLike, overrides: Optional[dict] = None) -> Recipe:
    """A checked Recipe from a Recipe, a dict shaped like the YAML, or the path of a YAML file. `overrides` is merged
    in as the CLI's --override JSON is. Relative data paths in a file are relative to that file; in a dict or a
    Recipe, relative to the working directory."""
    from .recipe import load_recipe as from_file
    from .recipe import merge, parse_recipe

    if isinstance(recipe, (str, Path)):
        return from_file(recipe, overrides)
    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        recipe = recipe.resolved()
    if not isinstance(recipe, dict):
        raise InputError(f"recipe: expected a Recipe, a dict or a YAML path; got {type(recipe).__name__}")
    return parse_recipe(merge(recipe, overrides) if overrides else recipe)


def apply(recipe: RecipeLike, checkpoint: Union[str, Path], out: Union[str, Path], *, data: Optional[str] = None,
          overwrite: Union[bool, str] = False, device: Optional[str] = None, resume: bool = False,
          dry_run: bool = False, overrides: Optional[dict] = None, log: Callable[[str], Any] = print,
          inputs: tuple = ()) -> dict:
    """`compress apply`: rewrite, verify, export, measure and report into `out`; returns report.json's record.

    overwrite=True replaces an earlier compress result at `out`, "force" whatever is there. A missed gate raises
    GateError (exit 4) with the record on `.record`, and nothing is published. `inputs`: more files that `out`
    must not hold (the CLI's recipe file); a recipe path is one already."""
    from .run.pipeline import apply as run

    if device not in DEVICES:
        raise InputError(f"--device {device!r}: use auto, cpu or cuda")
    inputs = (*inputs, *((Path(recipe),) if isinstance(recipe, (str, Path)) else ()))
    from .run.outdir import resolve_out

    return run(load_recipe(recipe, overrides), str(checkpoint), resolve_out(Path(out)), data=data, dry_run=dry_run,
               overwrite=overwrite, resume=resume, device=device, inputs=inputs, log=log)


def plan(recipe: RecipeLike, checkpoint: Union[str, Path], out: Union[str, Path, None] = None, *,
         data: Optional[str] = None, overwrite: bool = False, overrides: Optional[dict] = None,
         log: Callable[[str], Any] = print, inputs: Optional[dict] = None) -> dict:
    """`compress plan`: measure candidates against the recipe's `target:` and choose one. Returns the planner's
    summary (table, choice, seconds, ...) with "recipe", the chosen plain recipe as a dict (apply it, or build
    `Recipe(**it)`), and "written": `out` when given (a YAML file, written atomically), else None. An unreachable
    target raises TargetError (exit 4) with the measured candidates on `.plan`. `inputs`: more files `out` must not
    replace, by what they are ({"recipe": path} from the CLI)."""
    import yaml

    from .load.model import load
    from .planner.search import calibration_pair, planned_recipe, summary
    from .planner.search import plan as run_plan
    from .run.outdir import write_text_atomic

    r = load_recipe(recipe, overrides)
    inputs = {"recipe": recipe if isinstance(recipe, (str, Path)) else None, **(inputs or {})}
    where = inputs["recipe"] or "recipe"
    if r.target is None:
        raise InputError(f"{where}: no target: section to plan for; add e.g. 'target: {{speedup: 1.5, batch: 8}}'")
    if out is not None:
        out = Path(out)
        _check_plan_out(out, {**inputs, "checkpoint": str(checkpoint), "data": r.calibration_source(data)}, overwrite)
    r.check_calibration(data)
    loaded = load(str(checkpoint), r.model)
    calib_path = r.calibration_source(data)
    if loaded.source.get("preprocess_warning"):
        log(f"warning: {loaded.source['preprocess_warning']}")
    calib, holdout = calibration_pair(calib_path, loaded.data_cfg, r.calibration, log)
    result = run_plan(loaded, r, calib, log, holdout=holdout, real=calib_path is not None)
    chosen = planned_recipe(r, result, result["choice"])
    if out is not None:
        write_text_atomic(out, yaml.safe_dump(chosen, sort_keys=False))
    return {**summary(result), "recipe": chosen, "written": None if out is None else str(out)}


def _check_plan_out(out: Path, inputs: dict, overwrite: bool) -> None:
    """Before any work: `out` may replace an existing file only with overwrite, and never one of the inputs (the
    recipe's target: section would be lost to the plan written over it)."""
    if out.is_dir():
        raise InputError(f"-o {out} is a directory; give the path of the YAML file to write")
    dst = out.resolve()
    for what, item in inputs.items():
        if item is not None and Path(item).exists() and Path(item).resolve() == dst:
            raise InputError(f"-o {out} is the input {what} {item}; the plan would replace it, even with --overwrite: "
                             "choose another -o")
    if out.exists() and not overwrite:
        raise InputError(f"-o {out} already exists; pass --overwrite to replace it or choose another -o")
    if not out.parent.is_dir():  # found now, not after minutes of planning
        raise InputError(f"-o {out}: the folder {out.parent} does not exist; create it or choose another -o")


def inspect(checkpoint: Union[str, Path], *, recipe: Optional[RecipeLike] = None) -> dict:
    """`compress inspect`: family, blocks, params, FLOPs and what each pass would change. `recipe` supplies the
    model: section a bare weights file needs."""
    from .load.model import load
    from .run.inspect import inspect_model

    spec = load_recipe(recipe).model if recipe is not None else None
    return inspect_model(load(str(checkpoint), spec))


def verify(out: Union[str, Path], images: int = 8) -> dict:
    """`compress verify`: file hashes against report.json, model.onnx against the rebuilt safetensors. Returns what
    was checked; a mismatch raises VerificationError (exit 3)."""
    from .run.verify import verify as run

    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise InputError(f"images {images!r}: give a whole number of at least 1 (the inputs compared)")
    return run(Path(out), images)


def load_compressed(out: Union[str, Path]):
    """The torch module (eval mode) that `apply` wrote to `out` (its folder or its model.safetensors): the base
    architecture rebuilt, the recipe's passes replayed for their shapes, then the weights loaded strictly."""
    from .load.model import load_compressed as rebuild

    return rebuild(out).eval()
