"""Bad-input corpus: every case runs the real CLI in a subprocess and must fail cleanly.

For each case: the documented exit code, exactly one `error: ...` line on stderr that names the
problem (no traceback), and no file created, changed or removed anywhere under the case's
directory (which holds the inputs and the output path). Cases whose message or behaviour is a
known package bug are marked xfail(strict=True) with the observed stderr in the reason.

Speed: each subprocess imports torch, timm and onnx (~4-5 s of CPU), so the corpus is run up
front by a module fixture, a few subprocesses at a time (one per core, at least 2), and each
parametrized test then checks its own result. Selecting cases with -k runs only those.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

from conftest import FAST, run_cli, save_timm_dir, tiny_vit, tiny_vit_args, write_recipe

VIT_ARCH = "vit_tiny_patch16_224"
GOOD = "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\n" + FAST
_args = tiny_vit_args(heads=3)
# A model: section that describes the tiny ViT exactly (for bare weights files).
MODEL = yaml.safe_dump({"model": {"arch": f"timm:{VIT_ARCH}", "num_classes": _args["num_classes"],
                                  "img_size": _args["img_size"],
                                  "kwargs": {k: v for k, v in _args.items() if k not in ("num_classes", "img_size")}}},
                       default_flow_style=None)
PROC_OUT = Path("/proc/compress-test-out")


# ----------------------------------------------------------------------------- input builders

def vit(root: Path, name: str = "vit") -> Path:
    """The 3-head, 2-block tiny ViT as a timm directory."""
    return save_timm_dir(tiny_vit(heads=3), VIT_ARCH, _args, root / name)


def state_dict() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in tiny_vit(heads=3).state_dict().items()}


def bare(root: Path, name: str = "weights.safetensors", sd: Optional[dict] = None) -> Path:
    """A bare weights file (no config.json): the recipe's model: section must describe it."""
    path = root / name
    sd = state_dict() if sd is None else sd
    save_file(sd, str(path)) if path.suffix == ".safetensors" else torch.save(sd, path)
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def apply(root: Path, ckpt, text: str = GOOD, *extra, out: Optional[Path] = None) -> list:
    """CLI args for `apply` with the recipe `text` written to root/recipe.yaml and -o root/out."""
    recipe = write_recipe(root / "recipe.yaml", text)
    return ["apply", recipe, ckpt, "-o", out if out is not None else root / "out", *extra]


def good_with(extra_yaml: str) -> str:
    return GOOD + extra_yaml


def image_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


CORRUPT_IMAGES = {"cls/a.jpg": b"\xff\xd8 not really a jpeg", "cls/b.jpg": b"garbage", "other/c.png": b"\x89PNG junk"}


class Evil:
    """Unpickling this would create `marker`; a safe loader must refuse instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def build_evil_pickle(root: Path) -> list:
    path = root / "evil.pth"
    torch.save({"weight": torch.zeros(2), "payload": Evil(root / "MARKER")}, path)
    assert not (root / "MARKER").exists()  # saving must not have triggered it
    return apply(root, path, MODEL + GOOD)


def build_existing_output(root: Path) -> list:
    out = root / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious results\n")
    return apply(root, vit(root), GOOD, out=out)


def build_nan(root: Path) -> list:
    folder = vit(root)
    sd = state_dict()
    sd["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(sd, str(folder / "model.safetensors"))
    return apply(root, folder)


def build_tiny_resnet(root: Path) -> list:
    args = {"layers": [1, 1, 1, 1], "channels": [8, 8, 8, 8], "stem_width": 8, "num_classes": 5}
    torch.manual_seed(0)
    m = timm.create_model("resnet18", pretrained=False, **args).eval()
    return apply(root, save_timm_dir(m, "resnet18", args, root / "resnet"))


def build_hf_dir(root: Path) -> list:
    folder = root / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["ViTForImageClassification"], "model_type": "vit"}))
    bare(folder, "model.safetensors")
    return apply(root, folder)


def build_dir(root: Path, config: Optional[str], weights: bool = True) -> Path:
    folder = root / "ckpt"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    if weights:
        bare(folder, "model.safetensors")
    return folder


# ----------------------------------------------------------------------------- the corpus

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], list]  # creates every input under the case root; returns the CLI args
    expect: tuple[str, ...]  # substrings the one error line must contain (case-insensitive)
    code: int = 2
    xfail: Optional[str] = None  # reason (with the observed stderr) for a known package bug
    out_in_root: bool = True  # False only for the /proc output case


CASES = [
    # --- checkpoint ---------------------------------------------------------------------------
    Case("ckpt-missing", lambda r: apply(r, r / "no_such_model"), ("no_such_model", "not found"),
         xfail="a missing checkpoint path with no model: section is reported as a weights-only file; observed: "
               "'error: <root>/no_such_model holds weights only; add a 'model:' section with arch (e.g. timm:resnet18) "
               "to the recipe' (load() checks spec/config before it checks that the path exists)"),
    Case("ckpt-missing-with-model-section", lambda r: apply(r, r / "no_such.safetensors", MODEL + GOOD),
         ("checkpoint not found", "no_such.safetensors")),
    Case("safetensors-truncated", lambda r: apply(r, truncate(vit(r) / "model.safetensors").parent),
         ("model.safetensors", "truncated or corrupt")),
    Case("safetensors-zero-bytes", lambda r: apply(r, (lambda f: (f / "model.safetensors").write_bytes(b"") or f)(vit(r))),
         ("model.safetensors", "empty (0 bytes)")),
    Case("pth-zero-bytes", lambda r: apply(r, (lambda p: p.write_bytes(b"") or p)(r / "w.pth"), MODEL + GOOD),
         ("w.pth", "empty (0 bytes)")),
    Case("pth-truncated", lambda r: apply(r, truncate(bare(r, "w.pth")), MODEL + GOOD),
         ("w.pth", "cannot read")),
    Case("pth-not-a-state-dict", lambda r: apply(r, (lambda p: torch.save({"epoch": 3, "lr": 0.1}, p) or p)(r / "w.pth"),
                                                 MODEL + GOOD),
         ("w.pth", "not a state dict of tensors")),
    Case("pth-malicious-pickle", build_evil_pickle, ("refusing to load", "evil.pth")),
    Case("nan-weights", build_nan, ("blocks.1.mlp.fc1.weight", "NaN or Inf")),
    Case("wrong-architecture", lambda r: apply(r, bare(r), "model: {arch: timm:resnet18}\n" + GOOD),
         ("do not fit timm 'resnet18'", "missing")),
    Case("shape-mismatch-num-classes",
         lambda r: apply(r, bare(r), MODEL.replace("num_classes: 5", "num_classes: 10") + GOOD),
         ("shape mismatch", "head.weight")),
    Case("unknown-timm-arch", lambda r: apply(r, bare(r), MODEL.replace(VIT_ARCH, "vit_tiny_patch16_2244") + GOOD),
         ("unknown timm architecture 'vit_tiny_patch16_2244'", "close:")),
    Case("non-timm-arch-prefix", lambda r: apply(r, bare(r), MODEL.replace("timm:", "hf:") + GOOD),
         ("only timm architectures",)),
    Case("unknown-model-kwarg", lambda r: apply(r, bare(r), MODEL.replace("kwargs: {", "kwargs: {bogus_arg: 1, ") + GOOD),
         ("cannot build timm", "bogus_arg")),
    Case("unsupported-extension-npz", lambda r: apply(r, (lambda p: p.write_bytes(b"PK\x03\x04 numpy") or p)(r / "w.npz"),
                                                      MODEL + GOOD),
         ("unsupported checkpoint format '.npz'",)),
    Case("bare-weights-without-model-section", lambda r: apply(r, bare(r)),
         ("weights.safetensors", "holds weights only", "model:")),
    Case("dir-without-config", lambda r: apply(r, build_dir(r, None)), ("without config.json",)),
    Case("dir-config-invalid-json", lambda r: apply(r, build_dir(r, '{"architecture": "vit_tiny_patch16_224",')),
         ("config.json", "not valid JSON")),
    Case("dir-hf-transformers-config", build_hf_dir, ("Hugging Face transformers", "architecture")),
    Case("dir-without-weights", lambda r: apply(r, build_dir(r, json.dumps({"architecture": VIT_ARCH}), weights=False)),
         ("no weights file",)),
    Case("resnet-with-vit-pass", build_tiny_resnet, ("mlp_strip", "does not apply to timm-resnet", "skip_inapplicable")),
    # --- recipe file and schema --------------------------------------------------------------
    Case("recipe-missing", lambda r: ["apply", r / "nope.yaml", vit(r), "-o", r / "out"],
         ("recipe file not found", "nope.yaml")),
    Case("recipe-invalid-yaml", lambda r: apply(r, vit(r), "version: 1\npasses: [mlp_strip: {blocks: [0]}\n"),
         ("not valid YAML", "line")),
    Case("recipe-empty", lambda r: apply(r, vit(r), ""), ("top level must be a mapping",)),
    Case("recipe-top-level-list", lambda r: apply(r, vit(r), "- version: 1\n- passes: []\n"),
         ("top level must be a mapping", "list")),
    Case("recipe-missing-version", lambda r: apply(r, vit(r), GOOD.replace("version: 1\n", "")),
         ("version", "Field required")),
    Case("recipe-version-2", lambda r: apply(r, vit(r), GOOD.replace("version: 1", "version: 2")),
         ("version", "(got 2)")),
    Case("recipe-wrong-type", lambda r: apply(r, vit(r), good_with("calibration: {images: many}\n")),
         ("calibration.images", "'many'")),
    Case("recipe-negative-value", lambda r: apply(r, vit(r), good_with("calibration: {images: -3}\n")),
         ("calibration.images", "greater than 0", "-3")),
    Case("recipe-misspelled-top-key", lambda r: apply(r, vit(r), GOOD.replace("passes:", "pases:")),
         ("unknown key 'pases'", "did you mean 'passes'", "allowed here:", "version")),
    Case("recipe-misspelled-nested-key",
         lambda r: apply(r, vit(r), "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: {thread: 2}}\n"),
         ("unknown key 'report.latency.thread'", "did you mean 'threads'", "allowed here:", "batch_sizes")),
    Case("unknown-pass", lambda r: apply(r, vit(r), GOOD.replace("mlp_strip", "mlp_stirp")),
         ("unknown pass 'mlp_stirp'", "did you mean 'mlp_strip'")),
    Case("pass-entry-two-keys", lambda r: apply(r, vit(r), "version: 1\npasses:\n  - {mlp_strip: {blocks: [0]}, vo: {}}\n" + FAST),
         ("passes[0]", "must be one mapping")),
    Case("qk-merge-bad-mode", lambda r: apply(r, vit(r), "version: 1\npasses:\n  - qk_merge: {mode: sideways}\n" + FAST),
         ("passes[0].qk_merge.mode", "'sideways'")),
    Case("pass-unknown-option", lambda r: apply(r, vit(r), GOOD.replace("{blocks: [0]}", "{blocks: [0], fraction: 0.5}")),
         ("passes[0].mlp_strip.fraction", "allowed here: blocks")),
    Case("block-index-negative", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[-1]")),
         ("passes[0].mlp_strip.blocks", "greater than or equal to 0", "-1")),
    Case("block-index-duplicate", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[1, 1]")),
         ("mlp_strip.blocks", "lists a block twice")),
    Case("block-index-out-of-range", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[7]")),
         ("index 7", "out of range", "2 blocks")),
    Case("growth-guard", lambda r: apply(r, vit(r), "version: 1\npasses:\n  - qk_merge: {mode: exact}\n" + FAST),
         ("qk_merge would grow the model", "allow_growth")),
    Case("gate-needs-eval-data", lambda r: apply(r, vit(r), good_with("gates: {min_agreement: 0.9}\n")),
         ("min_agreement", "report.eval_data")),
    Case("gate-speedup-without-latency",
         lambda r: apply(r, vit(r), "version: 1\npasses: []\nreport: {latency: null}\ngates: {min_speedup: 1.1}\n"),
         ("min_speedup", "report.latency")),
    # --- data -------------------------------------------------------------------------------
    Case("data-option-missing", lambda r: apply(r, vit(r), GOOD, "--data", r / "no_images"),
         ("data not found", "no_images")),
    Case("calibration-data-missing-in-recipe", lambda r: apply(r, vit(r), good_with("calibration: {data: imgs/train.zip}\n")),
         ("data not found", "imgs/train.zip")),
    Case("data-zip-without-images",
         lambda r: apply(r, vit(r), GOOD, "--data", image_zip(r / "d.zip", {"readme.txt": b"hi", "cls/notes.txt": b"x"})),
         ("d.zip", "holds no images")),
    Case("data-zip-all-corrupt", lambda r: apply(r, vit(r), GOOD, "--data", image_zip(r / "d.zip", CORRUPT_IMAGES)),
         ("d.zip", "none of the 3 calibration images could be read")),
    Case("data-not-a-zip", lambda r: apply(r, vit(r), GOOD, "--data", (lambda p: p.write_text("text") or p)(r / "d.zip")),
         ("d.zip", "not a valid zip")),
    Case("eval-data-all-corrupt",  # fails only after export: the staged files must be cleaned up
         lambda r: (image_zip(r / "eval.zip", CORRUPT_IMAGES),
                    apply(r, vit(r), "version: 1\npasses: []\nexport: {formats: [safetensors]}\n"
                                     "report: {eval_data: eval.zip, latency: null}\n"))[1],
         ("eval.zip", "none of the evaluation images could be read")),
    # --- output path ------------------------------------------------------------------------
    Case("output-parent-is-a-file",
         lambda r: apply(r, vit(r), out=(lambda f: f.write_text("x") or f / "out")(r / "afile")),
         ("cannot write to", "afile/out", "Not a directory")),
    Case("output-deep-under-a-file",
         lambda r: apply(r, vit(r), out=(lambda f: f.write_text("x") or f / "a" / "b" / "out")(r / "afile")),
         ("cannot write to", "afile/a/b/out")),
    Case("output-in-proc", lambda r: apply(r, vit(r), out=PROC_OUT), ("cannot write to", str(PROC_OUT)), out_in_root=False),
    Case("output-exists-nonempty", build_existing_output, ("already exists", "--overwrite")),
    Case("output-exists-as-file", lambda r: apply(r, vit(r), out=(lambda f: f.write_text("x") or f)(r / "out")),
         ("already exists",)),
    Case("output-is-checkpoint-dir", lambda r: apply(r, vit(r), GOOD, "--overwrite", out=r / "vit"),
         ("overlaps the checkpoint",)),
    Case("output-inside-checkpoint-dir", lambda r: apply(r, vit(r), GOOD, "--overwrite", out=r / "vit" / "out"),
         ("overlaps the checkpoint",)),
    Case("output-is-recipe-file", lambda r: apply(r, vit(r), GOOD, "--overwrite", out=r / "recipe.yaml"),
         ("recipe.yaml",),
         xfail="--overwrite with -o pointing at the recipe file exits 0 and replaces the recipe by the output directory "
               "(only checkpoint overlap is checked; observed rc 0, empty stderr)"),
    # --- inspect ----------------------------------------------------------------------------
    Case("inspect-missing-path", lambda r: ["inspect", r / "no_such_model"], ("no_such_model", "not found"),
         xfail="inspect on a missing path says it is a weights file and asks for a recipe model: section; observed: "
               "'error: <root>/no_such_model holds weights only; add a 'model:' section with arch (e.g. timm:resnet18) "
               "to the recipe'"),
    Case("inspect-truncated", lambda r: ["inspect", truncate(vit(r) / "model.safetensors").parent],
         ("model.safetensors", "truncated or corrupt")),
    Case("inspect-recipe-missing", lambda r: ["inspect", vit(r), "--recipe", r / "nope.yaml"],
         ("recipe file not found", "nope.yaml")),
]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# ----------------------------------------------------------------------------- running

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: directories by name, files by size, mtime and sha256, links by target."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir",)
            elif stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            else:
                snap[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def diff(before: dict, after: dict) -> list[str]:
    out = [f"new: {k}" for k in sorted(after.keys() - before.keys())]
    out += [f"removed: {k}" for k in sorted(before.keys() - after.keys())]
    out += [f"changed: {k} {before[k]} -> {after[k]}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return out


@dataclass
class Result:
    root: Path
    args: list
    out: Optional[Path]
    out_existed: bool
    before: dict
    after: dict = field(default_factory=dict)
    proc: Optional[subprocess.CompletedProcess] = None
    seconds: float = 0.0


def _out_of(args: list) -> Optional[Path]:
    args = [str(a) for a in args]
    return Path(args[args.index("-o") + 1]) if "-o" in args else None


def _run(res: Result) -> Result:
    t0 = time.perf_counter()
    res.proc = run_cli(*res.args, cwd=res.root)  # cwd inside the case: a default ./compressed would be caught too
    res.seconds = time.perf_counter() - t0
    res.after = snapshot(res.root)
    return res


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> dict[str, Result]:
    """Build every selected case, snapshot it, then run the CLI on all of them, a few at a time."""
    wanted = {it.callspec.params["case"].id for it in request.session.items
              if getattr(it, "originalname", None) in _USES_CORPUS and hasattr(it, "callspec")
              and "case" in it.callspec.params}
    wanted |= {cid for it in request.session.items if getattr(it, "originalname", None) in _SPECIAL
               for cid in _SPECIAL[it.originalname]}
    systmp = tmp_path_factory.mktemp("systmp")  # TMPDIR of the subprocesses: must be empty at the end
    results = {}
    for case in CASES:
        if case.id not in wanted:
            continue
        root = tmp_path_factory.mktemp(case.id)
        args = case.build(root)
        out = _out_of(args)
        results[case.id] = Result(root, args, out, out is not None and out.exists(), snapshot(root))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(systmp))
        with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
            list(pool.map(_run, results.values()))
    results["__systmp__"] = systmp
    return results


# Tests that read the corpus: parametrized ones take `case`; special ones name the cases they need.
_USES_CORPUS = {"test_bad_input"}
_SPECIAL = {"test_malicious_pickle_never_runs": ["pth-malicious-pickle"],
            "test_existing_output_left_unchanged": ["output-exists-nonempty"],
            "test_checkpoint_intact_when_output_is_checkpoint": ["output-is-checkpoint-dir"],
            "test_no_temp_files_left_in_tmpdir": ["eval-data-all-corrupt", "data-zip-all-corrupt"]}


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


# ----------------------------------------------------------------------------- tests

def test_good_recipe_runs(vit_dir, tmp_path):
    """Control: the recipe the bad cases are derived from works on the same tiny model."""
    recipe = write_recipe(tmp_path / "recipe.yaml", GOOD)
    out = tmp_path / "out"
    r = run_cli("apply", recipe, vit_dir, "-o", out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("model.safetensors", "model.onnx", "report.json", "report.md", "report.png", "recipe.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "report.json").read_text())["passes"][0]["pass"] == "mlp_strip"
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_good_bare_weights_with_model_section(tmp_path):
    """Control: MODEL describes the tiny ViT exactly, so the bare-file cases fail for the file, not the spec."""
    args = apply(tmp_path, bare(tmp_path), MODEL + GOOD, "--dry-run")
    before = snapshot(tmp_path)
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dry run: nothing written" in r.stdout
    assert diff(before, snapshot(tmp_path)) == []


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, corpus):
    res: Result = corpus[case.id]
    r = res.proc
    err = r.stderr.strip()
    lines = err.splitlines()
    # 1. the documented exit code
    assert r.returncode == case.code, f"exit {r.returncode}, expected {case.code}; stderr:\n{r.stderr}"
    # 2. one line, `error: `, no traceback, names the problem
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{r.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    for s in case.expect:
        assert s.lower() in err.lower(), f"{s!r} not in {err!r}"
    # 3. nothing created, changed or removed; no output directory
    assert diff(res.before, res.after) == [], f"files changed by a failed run (stderr: {err})"
    if res.out is not None:
        assert (res.root in res.out.parents or res.out == res.root) == case.out_in_root
        if not res.out_existed:
            assert not res.out.exists(), f"{res.out} was created"
        if res.out.parent.is_dir():  # no staging (.out.tmp-*) or backup (.out.old-*) left beside it
            assert list(res.out.parent.glob(f".{res.out.name}.*")) == []


def test_malicious_pickle_never_runs(corpus):
    res: Result = corpus["pth-malicious-pickle"]
    assert (res.root / "evil.pth").is_file()
    assert not (res.root / "MARKER").exists(), "unpickling executed code from the checkpoint"
    assert res.proc.returncode == 2
    assert "refusing" in res.proc.stderr and "could run code" in res.proc.stderr


def test_existing_output_left_unchanged(corpus):
    res: Result = corpus["output-exists-nonempty"]
    assert res.proc.returncode == 2
    assert sorted(p.name for p in res.out.iterdir()) == ["keep.txt"]
    assert (res.out / "keep.txt").read_text() == "precious results\n"


def test_checkpoint_intact_when_output_is_checkpoint(corpus):
    res: Result = corpus["output-is-checkpoint-dir"]
    assert res.proc.returncode == 2
    assert sorted(p.name for p in res.out.iterdir()) == ["config.json", "model.safetensors"]
    assert res.after["vit/model.safetensors"] == res.before["vit/model.safetensors"]


def test_no_temp_files_left_in_tmpdir(corpus):
    """The subprocesses ran with TMPDIR set to one folder; failed runs must not leave anything there."""
    systmp: Path = corpus["__systmp__"]
    assert corpus["eval-data-all-corrupt"].proc.returncode == 2  # failed after the teacher temp dir was made
    assert sorted(p.name for p in systmp.iterdir()) == []
