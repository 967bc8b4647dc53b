"""Bad-input corpus: every case runs the real CLI in a subprocess and must fail cleanly.

For each case: the documented exit code, exactly one `error: ...` line on stderr that names the
problem (no traceback), and no file created, changed or removed anywhere under the case's
directory (which holds the inputs and the output path). Cases whose message or behaviour is a
known package bug are marked xfail(strict=True) with the observed stderr in the reason.

Speed: each subprocess is forked from one that has imported torch, timm and onnx already
(tests/forkcli.py: ~4-5 s of CPU saved a case); the corpus is run up front by a module fixture,
2-4 subprocesses at a time (one per core), and each parametrized test then checks its own
result. Selecting tests with -k runs only the cases they need.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
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
from tests import forkcli

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


def bare(root: Path, name: str = "weights.safetensors") -> Path:
    """The tiny ViT's weights as a bare file (no config.json): the recipe's model: section must describe it."""
    path = root / name
    save_file(state_dict(), str(path)) if path.suffix == ".safetensors" else torch.save(state_dict(), path)
    return path


def put(path: Path, data) -> Path:
    """Write bytes or text to path; return the path."""
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def pth(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def put_sd(path: Path, sd: dict) -> Path:
    save_file(sd, str(path))
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def apply(root: Path, ckpt, text: str = GOOD, *extra, out: Optional[Path] = None) -> list:
    """CLI args for `apply` with the recipe `text` written to root/recipe.yaml and -o root/out."""
    recipe = write_recipe(root / "recipe.yaml", text)
    return ["apply", recipe, ckpt, "-o", out if out is not None else root / "out", *extra]


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


def build_corrupt_eval(root: Path) -> list:
    """Fails only after export and measuring, so the staged files and temp dirs must be cleaned up."""
    image_zip(root / "eval.zip", CORRUPT_IMAGES)
    text = ("version: 1\npasses: []\nexport: {formats: [safetensors]}\n"
            "report: {eval_data: eval.zip, latency: null}\n")  # relative to the recipe file
    return apply(root, vit(root), text)


def build_output_is_recipe_dir(root: Path) -> list:
    """-o names the folder that holds the recipe; --overwrite must not let it replace that folder."""
    (root / "recipes").mkdir()
    recipe = write_recipe(root / "recipes" / "recipe.yaml", GOOD)
    return ["apply", recipe, vit(root), "-o", root / "recipes", "--overwrite"]


def build_zoo_duplicate(root: Path) -> list:
    write_recipe(root / "recipe.yaml", GOOD)
    vit(root)
    zoo = put(root / "zoo.yaml", "version: 1\nrecipe: recipe.yaml\nentries:\n  - checkpoint: vit\n"
                                 "    overrides: {passes: []}\n    overrides: {}\n")
    return ["batch", zoo, "-o", root / "out"]


PLAN = "version: 1\ncalibration: {images: 8}\ntarget: {flops: 0.6}\n" + FAST


def build_plan_onto_recipe_link(root: Path) -> list:
    """-o names a link to the input recipe: the paths are resolved, --overwrite does not allow it."""
    recipe = write_recipe(root / "recipe.yaml", PLAN)
    (root / "plan.yaml").symlink_to(recipe)
    return ["plan", recipe, vit(root), "-o", root / "plan.yaml", "--overwrite"]


def build_plan_onto_existing(root: Path) -> list:
    put(root / "plan.yaml", "# yesterday's plan, kept\n")
    return ["plan", write_recipe(root / "recipe.yaml", PLAN), vit(root), "-o", root / "plan.yaml"]


def result_dir(root: Path, report) -> Path:
    """A result directory as `compress verify` reads it: two small files and `report` as report.json."""
    from compress.run.outdir import sha256

    res = root / "res"
    res.mkdir()
    put(res / "model.safetensors", b"weights")
    put(res / "model.onnx", b"graph")
    if callable(report):
        report = report({"onnx": {"path": "model.onnx", "bytes": 5, "sha256": sha256(res / "model.onnx")},
                         "safetensors": {"path": "model.safetensors", "bytes": 7, "sha256": sha256(res / "model.safetensors")}})
    put(res / "report.json", report if isinstance(report, str) else json.dumps(report))
    return res


def without_hash(arts: dict) -> dict:
    del arts["safetensors"]["sha256"]
    return {"artifacts": arts, "input_size": [3, 16, 16]}


def build_dir(root: Path, config: Optional[str]) -> Path:
    """A directory holding model.safetensors and, unless config is None, that config.json text."""
    folder = root / "ckpt"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
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


# The cases first, grouped by input; the extras at the end each guard another code path.

CASES = [
    # --- checkpoint ---------------------------------------------------------------------------
    Case("ckpt-missing", lambda r: apply(r, r / "no_such_model"), ("checkpoint not found", "no_such_model")),
    Case("ckpt-missing-with-model-section", lambda r: apply(r, r / "no_such.safetensors", MODEL + GOOD),
         ("checkpoint not found", "no_such.safetensors")),
    Case("safetensors-truncated", lambda r: apply(r, truncate(vit(r) / "model.safetensors").parent),
         ("model.safetensors", "truncated or corrupt")),
    Case("safetensors-zero-bytes", lambda r: apply(r, put(vit(r) / "model.safetensors", b"").parent),
         ("model.safetensors", "empty (0 bytes)")),
    Case("pth-zero-bytes", lambda r: apply(r, put(r / "w.pth", b""), MODEL + GOOD), ("w.pth", "empty (0 bytes)")),
    Case("pth-not-a-state-dict", lambda r: apply(r, pth(r / "w.pth", {"epoch": 3, "lr": 0.1}), MODEL + GOOD),
         ("w.pth", "not a state dict of tensors")),
    Case("pth-malicious-pickle", build_evil_pickle, ("refusing to load", "evil.pth", "could run code")),
    Case("nan-weights", build_nan, ("blocks.1.mlp.fc1.weight", "NaN or Inf")),
    Case("wrong-architecture", lambda r: apply(r, bare(r), "model: {arch: timm:resnet18}\n" + GOOD),
         ("do not fit timm 'resnet18'", "missing", "unexpected")),
    # Only the head differs (no missing/unexpected keys listed): MODEL describes the tiny ViT exactly
    # otherwise, so the other bare-file cases fail for their file, not for the model: section.
    Case("shape-mismatch-num-classes",
         lambda r: apply(r, bare(r), MODEL.replace("num_classes: 5", "num_classes: 10") + GOOD),
         ("fit timm 'vit_tiny_patch16_224': 2 shape mismatch", "head.weight [5, 24] vs [10, 24]")),
    Case("unknown-timm-arch", lambda r: apply(r, bare(r), MODEL.replace(VIT_ARCH, "vit_tiny_patch16_2244") + GOOD),
         ("unknown timm architecture 'vit_tiny_patch16_2244'", "close: vit_tiny_patch16_224")),
    # the content decides, not the name: a zip that is not a PyTorch archive is refused for what it is
    Case("zip-not-torch-npz", lambda r: apply(r, put(r / "w.npz", b"PK\x03\x04 numpy"), MODEL + GOOD),
         ("w.npz", "not a PyTorch checkpoint")),
    Case("zip-not-torch-without-model-section", lambda r: apply(r, put(r / "w.npz", b"PK\x03\x04 numpy")),
         ("w.npz", "not a PyTorch checkpoint")),
    Case("unknown-content", lambda r: apply(r, put(r / "w.pth", b"GIF89a not weights at all"), MODEL + GOOD),
         ("w.pth", "neither safetensors nor a PyTorch checkpoint")),
    Case("bare-weights-without-model-section", lambda r: apply(r, bare(r)),
         ("weights.safetensors", "a timm ViT state dict", "head count", "model:")),
    Case("keys-match-no-family", lambda r: apply(r, put_sd(r / "odd.safetensors", {"encoder.w1": torch.ones(2)})),
         ("odd.safetensors", "match no known family", "candidates: timm/torchvision ResNet", "keys seen: encoder.w1")),
    Case("hf-dir-unsupported-architecture",
         lambda r: apply(r, build_dir(r, '{"architectures": ["BertModel"], "model_type": "bert"}')),
         ("Hugging Face BertModel is not supported", "ViTForImageClassification")),
    Case("user-factory-not-importable", lambda r: apply(r, bare(r), "model: {arch: 'no_such_pkg.models:vit'}\n" + GOOD),
         ("no_such_pkg.models:vit", "cannot import no_such_pkg")),
    Case("dir-without-config", lambda r: apply(r, build_dir(r, None)), ("ckpt", "without config.json")),
    Case("dir-config-invalid-json", lambda r: apply(r, build_dir(r, '{"architecture": "vit_tiny_patch16_224",')),
         ("config.json", "not valid JSON")),
    # --- recipe file and schema --------------------------------------------------------------
    Case("recipe-missing", lambda r: ["apply", r / "nope.yaml", vit(r), "-o", r / "out"],
         ("recipe file not found", "nope.yaml")),
    Case("recipe-invalid-yaml", lambda r: apply(r, vit(r), "version: 1\npasses: [mlp_strip: {blocks: [0]}\n"),
         ("recipe.yaml", "not valid YAML", "line 3")),
    Case("recipe-top-level-list", lambda r: apply(r, vit(r), "- version: 1\n- passes: []\n"),
         ("top level must be a mapping", "got list")),
    Case("recipe-empty", lambda r: apply(r, vit(r), ""), ("recipe.yaml", "is empty")),
    Case("distill-without-data", lambda r: apply(r, vit(r), GOOD + "distill: {steps: 2}\n"),
         ("distill: no training data", "--data")),
    Case("distill-steps-and-epochs", lambda r: apply(r, vit(r), GOOD + "distill: {steps: 2, epochs: 1}\n"),
         ("distill", "set steps or epochs, not both")),
    Case("distill-data-missing", lambda r: apply(r, vit(r), GOOD + f"distill: {{data: {r / 'nope.zip'}, steps: 2}}\n"),
         ("data not found", "nope.zip")),
    Case("device-unknown", lambda r: apply(r, vit(r), GOOD, "--device", "tpu"), ("--device 'tpu'", "auto, cpu or cuda")),
    Case("recipe-missing-version", lambda r: apply(r, vit(r), GOOD.replace("version: 1\n", "")),
         ("version: Field required",)),
    Case("recipe-version-2", lambda r: apply(r, vit(r), GOOD.replace("version: 1", "version: 2")),
         ("version: Input should be 1", "(got 2)")),
    Case("recipe-wrong-type", lambda r: apply(r, vit(r), GOOD + "calibration: {images: many}\n"),
         ("calibration.images", "valid integer", "'many'")),
    Case("recipe-negative-value", lambda r: apply(r, vit(r), GOOD + "calibration: {images: -3}\n"),
         ("calibration.images", "greater than 0", "-3")),
    Case("recipe-misspelled-top-key", lambda r: apply(r, vit(r), GOOD.replace("passes:", "pases:")),
         ("unknown key 'pases'", "did you mean 'passes'", "allowed here:", "version")),
    Case("recipe-misspelled-nested-key",
         lambda r: apply(r, vit(r), "version: 1\npasses:\n  - mlp_strip: {blocks: [0]}\nreport: {latency: {thread: 2}}\n"),
         ("unknown key 'report.latency.thread'", "did you mean 'threads'", "allowed here:", "batch_sizes")),
    Case("unknown-pass", lambda r: apply(r, vit(r), GOOD.replace("mlp_strip", "mlp_stirp")),
         ("unknown pass 'mlp_stirp'", "did you mean 'mlp_strip'")),
    Case("qk-merge-bad-mode", lambda r: apply(r, vit(r), "version: 1\npasses:\n  - qk_merge: {mode: sideways}\n" + FAST),
         ("passes[0].qk_merge.mode", "'sideways'")),
    Case("pass-unknown-option", lambda r: apply(r, vit(r), GOOD.replace("{blocks: [0]}", "{blocks: [0], colour: red}")),
         ("unknown key 'passes[0].mlp_strip.colour'", "allowed here: blocks")),
    Case("block-index-negative", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[-1]")),
         ("passes[0].mlp_strip.blocks: blocks must be 'all', 'auto' or a list of block indices", "-1")),
    Case("block-index-duplicate", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[1, 1]")),
         ("recipe passes[0]: mlp_strip.blocks", "lists a block twice")),
    Case("block-index-out-of-range", lambda r: apply(r, vit(r), GOOD.replace("[0]", "[7]")),
         ("recipe passes[0]: mlp_strip.blocks: index 7", "out of range", "2 blocks")),
    Case("growth-guard", lambda r: apply(r, vit(r), "version: 1\npasses:\n  - qk_merge: {mode: exact}\n" + FAST),
         ("qk_merge would grow the model", "allow_growth")),
    Case("gate-needs-eval-data", lambda r: apply(r, vit(r), GOOD + "gates: {min_agreement: 0.9}\n"),
         ("min_agreement", "report.eval_data")),
    # --- data -------------------------------------------------------------------------------
    Case("data-missing", lambda r: apply(r, vit(r), GOOD, "--data", r / "no_images"), ("data not found", "no_images")),
    Case("data-zip-without-images",
         lambda r: apply(r, vit(r), GOOD, "--data", image_zip(r / "d.zip", {"readme.txt": b"hi", "cls/notes.txt": b"x"})),
         ("d.zip", "holds no images")),
    Case("data-zip-all-corrupt", lambda r: apply(r, vit(r), GOOD, "--data", image_zip(r / "d.zip", CORRUPT_IMAGES)),
         ("d.zip", "none of the 3 calibration images could be read")),
    # --- output path ------------------------------------------------------------------------
    Case("output-parent-is-a-file", lambda r: apply(r, vit(r), out=put(r / "afile", "x") / "out"),
         ("cannot create the output directory", "afile/out", "Not a directory")),
    Case("output-in-proc", lambda r: apply(r, vit(r), out=PROC_OUT), ("cannot create the output directory", str(PROC_OUT)), out_in_root=False),
    Case("output-exists-nonempty", build_existing_output, ("already exists", "--overwrite")),
    Case("output-is-checkpoint-dir", lambda r: apply(r, vit(r), GOOD, "--overwrite", out=r / "vit"),
         ("output", "overlaps the input", "vit")),
    # --- inspect ----------------------------------------------------------------------------
    Case("inspect-missing-path", lambda r: ["inspect", r / "no_such_model"], ("checkpoint not found", "no_such_model")),
    # --- extras beyond the list -------------------------------------------------------
    Case("resnet-with-vit-pass", build_tiny_resnet, ("mlp_strip", "does not apply to timm-resnet", "skip_inapplicable")),
    Case("eval-data-all-corrupt", build_corrupt_eval, ("eval.zip", "none of the evaluation images could be read")),
    Case("output-is-recipe-file", lambda r: apply(r, vit(r), GOOD, "--overwrite", out=r / "recipe.yaml"),
         ("recipe.yaml", "not a directory")),
    Case("output-is-recipe-dir", build_output_is_recipe_dir, ("overlaps the input", "recipe.yaml")),
    # --- a key given twice: YAML keeps the last one silently (issue 31) --------------------------
    Case("recipe-duplicate-key", lambda r: apply(r, vit(r), GOOD + "passes: []\n"),
         ("recipe", "recipe.yaml", "duplicate key 'passes'", "lines 2 and 5")),
    Case("recipe-duplicate-nested-key",
         lambda r: apply(r, vit(r), GOOD + "calibration:\n  images: 8\n  seed: 1\n  images: 16\n"),
         ("recipe.yaml", "duplicate key 'calibration.images'", "lines 6 and 8")),
    Case("recipe-duplicate-key-in-flow-mapping", lambda r: apply(r, vit(r), GOOD.replace("[0]}", "[0], blocks: [1]}")),
         ("duplicate key 'passes[0].mlp_strip.blocks'", "twice on line 3")),
    Case("zoo-duplicate-key", build_zoo_duplicate, ("zoo", "zoo.yaml", "duplicate key 'entries[0].overrides'", "lines 5 and 6")),
    Case("override-duplicate-key", lambda r: apply(r, vit(r), GOOD, "--override", '{"passes": [], "passes": []}'),
         ("--override", "duplicate key 'passes'")),
    # --- plan -o ---------------------------------------------------------------------------------
    Case("plan-output-is-input-recipe",
         lambda r: ["plan", write_recipe(r / "recipe.yaml", PLAN), vit(r), "-o", r / "recipe.yaml", "--overwrite"],
         ("is the input recipe", "recipe.yaml", "even with --overwrite")),
    Case("plan-output-links-to-input-recipe", build_plan_onto_recipe_link, ("plan.yaml", "is the input recipe")),
    Case("plan-output-exists", build_plan_onto_existing, ("plan.yaml", "already exists", "--overwrite")),
    Case("plan-output-folder-missing",
         lambda r: ["plan", write_recipe(r / "recipe.yaml", PLAN), vit(r), "-o", r / "nowhere" / "plan.yaml"],
         ("nowhere", "does not exist")),
    # --- verify ----------------------------------------------------------------------------------
    Case("verify-not-found", lambda r: ["verify", r / "no_such_result"], ("no_such_result not found",)),
    Case("verify-no-report", lambda r: ["verify", vit(r)], ("vit: no report.json",)),
    Case("verify-a-file", lambda r: ["verify", put(r / "report.json", "{}")], ("report.json is a file", "directory")),
    Case("verify-report-is-a-list", lambda r: ["verify", result_dir(r, "[]")], ("report.json", "JSON list"), code=3),
    Case("verify-artifacts-not-an-object", lambda r: ["verify", result_dir(r, {"artifacts": [1]})],
         ("report.json", "'artifacts' is a list"), code=3),
    Case("verify-hash-removed", lambda r: ["verify", result_dir(r, without_hash)],
         ("model.safetensors has no sha256",), code=3),
]
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


# ----------------------------------------------------------------------------- running

def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: directories by name, files by mode, size, mtime and sha256, links by target.

    Directory mtimes are left out on purpose: a run that stages beside the output and then cleans
    up touches its parent directory's mtime without leaving anything behind.
    """
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
                snap[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
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


def _out_of(args: list) -> Optional[Path]:
    args = [str(a) for a in args]
    return Path(args[args.index("-o") + 1]) if "-o" in args else None


def _run(res: Result) -> Result:
    res.proc = run_cli(*res.args, cwd=res.root)  # cwd inside the case: a default ./compressed would be caught too
    res.after = snapshot(res.root)
    return res


# Which corpus entries each non-parametrized test reads (so `-k` selects only what it needs).
NEEDS = {"test_malicious_pickle_never_runs": ["pth-malicious-pickle"],
         "test_existing_output_left_unchanged": ["output-exists-nonempty"],
         "test_checkpoint_intact_when_output_is_checkpoint": ["output-is-checkpoint-dir"],
         "test_no_temp_files_left_in_tmpdir": ["eval-data-all-corrupt", "data-zip-all-corrupt"]}


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> dict[str, Result]:
    """Build every selected case in its own directory and snapshot it; then run the CLI on all, 2-4 at a time."""
    wanted = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if item.originalname == "test_bad_input" and callspec is not None:
            wanted.add(callspec.params["case"].id)
        wanted.update(NEEDS.get(item.originalname, []))
    results = {}
    for case in CASES:
        if case.id in wanted:
            root = tmp_path_factory.mktemp(case.id)
            args = case.build(root)
            out = _out_of(args)
            results[case.id] = Result(root, args, out, out is not None and out.exists(), snapshot(root))
    systmp = tmp_path_factory.mktemp("systmp")  # TMPDIR of the subprocesses, checked at the end
    forkcli.start()  # the fork server itself keeps the TMPDIR it starts with
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(systmp))
        with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
            list(pool.map(_run, results.values()))
    return {**results, "__systmp__": systmp}


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml", "vit"]  # no staging/backup left


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
    assert "\x1b" not in r.stderr, "terminal control codes in an error line"
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


def test_malicious_pickle_never_runs(corpus, tmp_path):
    res: Result = corpus["pth-malicious-pickle"]
    assert (res.root / "evil.pth").is_file()
    assert not (res.root / "MARKER").exists(), "compress unpickled the checkpoint and ran its payload"
    assert res.proc.returncode == 2 and "refusing to load" in res.proc.stderr
    # Positive control: the same kind of payload really runs when unpickled without weights_only.
    torch.save({"payload": Evil(tmp_path / "MARKER")}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert (tmp_path / "MARKER").exists()


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
    # onnxruntime keeps a session-id file `.ses` in TMPDIR by design; anything of compress's must be gone.
    assert sorted(p.name for p in systmp.iterdir() if p.name != ".ses") == []
