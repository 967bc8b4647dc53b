"""Every command and recipe shown in README.md and docs/*.md is run or checked here, so the docs cannot drift.

A fenced block says what it holds: ```bash, ```sh or ```console are commands, ```yaml a recipe (or a zoo file, or
a Kubernetes manifest), ```text output, ```python code. A block with no language fails the test.
- Commands: lines that start with `compress`, `make`, `python -m` or `torchrun`. They run in document order, one
  scratch folder per page laid out like a checkout (recipes/ linked in, ../shared beside it), `compress` through
  the fork server (tests/forkcli.py: no 5 s of imports per command), and must exit 0. A line that a test cannot run
  (an hour of `make bench`, torchrun on GPUs, a Slurm array) ends with `# not run by tests: REASON`; at most
  MAX_NOT_RUN such lines exist, so the escape hatch stays narrow.
- Recipes: a block whose top-level keys are all recipe keys is parsed by the recipe parser (a fragment merged into
  a minimal recipe). One with passes and no `model:` section is also applied with `--dry-run` to the shared ViT:
  that runs the load and every pass, where a refusal or a bad config shows. Not a full apply: each would evaluate
  up to 2,000 images and time onnxruntime for 20-60 s, and the commands already run a full apply end to end.
- A zoo file (`entries:`) is read by the zoo reader; a Kubernetes manifest (`apiVersion:`) only as YAML.
- Python blocks compile, and every `compress.NAME` they use exists (tests/test_api.py runs what they show).
Static checks: no absolute machine path in a tracked Markdown file, README <= 250 lines, docs/ >= 5 pages of
<= 300 lines each, every relative link (and #anchor) resolves.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import compress
from compress.recipe import Recipe, merge, parse_recipe
from compress.run.batch import load_zoo
from tests import forkcli
from tests.conftest import CIFAR_TRAIN, SHARED, VIT_TEACHER, REPO, need_shared

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
COMMAND = re.compile(r"^(compress|make|python -m|torchrun)\b")
NOT_RUN = "# not run by tests:"
MAX_NOT_RUN = 22  # 20, then docs/operations.md: a batch retry and a two-rank torchrun
FENCE = re.compile(r"^```(\S*)\s*$")


def blocks(text: str) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block."""
    found, lang, body, start = [], None, [], 0
    for i, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if lang is None and m:
            lang, body, start = m.group(1), [], i
        elif lang is not None and line.startswith("```"):
            found.append((lang, "\n".join(body), start))
            lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"a ``` block opened at line {start} is never closed"
    return found


def commands(text: str) -> list[tuple[str, bool]]:
    """(command, runs) for each command line of the page's shell blocks; runs is False for marked lines."""
    found = []
    for lang, body, _ in blocks(text):
        if lang not in ("bash", "sh", "console"):
            continue
        for line in body.splitlines():
            line = line.strip().removeprefix("$ ")
            if COMMAND.match(line):
                found.append((re.sub(r"\s+#\s.*$", "", line).strip(), NOT_RUN not in line))  # comment dropped
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A scratch folder shaped like the checkout: recipes/ linked in and ../shared beside it, so the docs' relative
    paths (recipes/..., ../shared/...) mean here what they mean in a clone."""
    need_shared(VIT_TEACHER)
    root = tmp_path_factory.mktemp("docs")
    (root / "shared").symlink_to(SHARED.resolve())
    return root


def _workdir(checkout: Path, name: str) -> Path:
    work = checkout / name
    work.mkdir()
    (work / "recipes").symlink_to(REPO / "recipes")
    return work


def run_command(line: str, cwd: Path) -> subprocess.CompletedProcess:
    assert not re.search(r"[|><;&$`]", line), f"{line!r}: a shell construct; show a plain command or mark it"
    words = shlex.split(line)
    if words[0] == "compress" or words[:3] == ["python", "-m", "compress"]:
        args = words[1:] if words[0] == "compress" else words[3:]
        return forkcli.run(args, cwd, {**os.environ, "TMPDIR": str(cwd)}, timeout=300)
    if words[0] == "python":
        words[0] = sys.executable
    return subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=300)


RUN_PAGES = [p for p in PAGES if any(runs for _, runs in commands(p.read_text()))]


@pytest.mark.parametrize("page", RUN_PAGES, ids=_rel)
def test_every_command_on_the_page_runs(page, checkout):
    run = [c for c, runs in commands(page.read_text()) if runs]
    work = _workdir(checkout, page.stem)
    for line in run:
        res = run_command(line, work)
        assert res.returncode == 0, f"{_rel(page)}: `{line}` exited {res.returncode}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"


def test_few_commands_are_marked_not_run_and_each_says_why():
    marked = [(page, line) for page in PAGES for line in page.read_text().splitlines() if NOT_RUN in line]
    assert 0 < len(marked) <= MAX_NOT_RUN, f"{len(marked)} lines marked '{NOT_RUN}' (at most {MAX_NOT_RUN})"
    for page, line in marked:
        assert len(line.split(NOT_RUN)[1].strip()) >= 10, f"{_rel(page)}: no reason given in {line!r}"
    shown = [c for page in PAGES for c, _ in commands(page.read_text())]
    assert sum(1 for p in PAGES for c, runs in commands(p.read_text()) if runs) >= 5, shown


RECIPE_KEYS = set(Recipe.model_fields)


def _yaml_blocks() -> list:
    return [pytest.param(page, body, id=f"{_rel(page)}:{line}")
            for page in PAGES for lang, body, line in blocks(page.read_text()) if lang == "yaml"]


@pytest.mark.parametrize(("page", "body"), _yaml_blocks())
def test_every_yaml_block_is_a_valid_recipe_zoo_or_manifest(page, body, checkout, tmp_path):
    data = yaml.safe_load(body)
    assert isinstance(data, dict), f"{_rel(page)}: a YAML block that is not a mapping:\n{body}"
    if "apiVersion" in data:  # a Kubernetes manifest: its command line is a `compress batch` shown elsewhere
        assert "compress batch" in body
        return
    if "entries" in data:
        zoo = tmp_path / "zoo.yaml"
        zoo.write_text(body)
        assert len(load_zoo(zoo)) == len(data["entries"])
        return
    assert set(data) <= RECIPE_KEYS, f"{_rel(page)}: keys {sorted(set(data) - RECIPE_KEYS)} are no recipe keys:\n{body}"
    full = "version" in data
    recipe = parse_recipe(data if full else merge({"version": 1, "report": {"eval_data": "test.zip"}}, data))
    if not recipe.steps or recipe.model is not None:
        return
    folder = checkout / "r" / f"{page.stem}-{abs(hash(body)) % 10**8}"  # two levels below shared/, as recipes/ is
    folder.mkdir(parents=True)
    extra = {} if full else {"calibration": {"data": str(need_shared(CIFAR_TRAIN)), "images": 16}}
    path = folder / "recipe.yaml"
    path.write_text(body if full else yaml.safe_dump({"version": 1, **data, **extra}))
    res = forkcli.run(["apply", path, need_shared(VIT_TEACHER), "--dry-run"], folder, None, timeout=300)
    assert res.returncode == 0, f"{_rel(page)}: the recipe block failed a dry run:\n{res.stdout[-1500:]}{res.stderr[-1500:]}"


PY_PAGES = [p for p in PAGES if any(lang == "python" for lang, _, _ in blocks(p.read_text()))]


@pytest.mark.parametrize("page", PY_PAGES, ids=_rel)
def test_python_blocks_run(page, checkout, monkeypatch):
    """In this process (torch is imported already), in the page's order, from a checkout-shaped folder; a block
    with a `# not run by tests:` line is only compiled. Each uses only names the public API has."""
    monkeypatch.chdir(_workdir(checkout, f"py-{page.stem}"))
    scope: dict = {}
    for lang, body, line in blocks(page.read_text()):
        if lang != "python":
            continue
        code = compile(body, f"{_rel(page)}:{line}", "exec")
        used = {n.attr for n in ast.walk(ast.parse(body)) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "compress"}
        assert {u for u in used if not hasattr(compress, u)} == set(), f"{_rel(page)}:{line}: not in compress"
        if NOT_RUN not in body:
            exec(code, scope)


def test_every_block_says_what_it_holds():
    for page in PAGES:
        unnamed = [line for lang, _, line in blocks(page.read_text()) if not lang]
        assert not unnamed, f"{_rel(page)}: ``` blocks at lines {unnamed} name no language (bash, yaml, text, python)"


def _tracked_markdown() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return [p for p in REPO.rglob("*.md") if ".venv" not in p.parts]
    return [REPO / n for n in out.splitlines() if (REPO / n).is_file()]


MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|home|tmp)/")


def test_no_markdown_file_names_a_path_of_this_machine():
    found = [f"{_rel(p)}:{i}" for p in _tracked_markdown() for i, line in enumerate(p.read_text().splitlines(), 1)
             if MACHINE_PATH.search(line)]
    assert found == [], f"absolute machine paths (write them relative to the checkout): {found}"


def test_readme_is_short_and_docs_pages_are_many_and_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
    pages = sorted((REPO / "docs").glob("*.md"))
    assert len(pages) >= 5
    long = {_rel(p): n for p in pages if (n := len(p.read_text().splitlines())) > 300}
    assert long == {}, f"docs pages over 300 lines: {long}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    out = set()
    for lang_free in re.sub(r"```.*?```", "", text, flags=re.S).splitlines():
        if lang_free.startswith("#"):
            title = lang_free.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_every_relative_link_resolves():
    bad = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                bad.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                bad.append(f"{_rel(page)}: {target} (no such heading)")
    assert bad == [], bad


def test_the_checks_can_fail():
    """Controls: an unmarked command is found and run-bound, a machine path is caught, a bad anchor is missed."""
    page = "```bash\ncompress schema  # JSON\nmake bench  # not run by tests: an hour of timing\n```\n```\nout\n```\n"
    assert commands(page) == [("compress schema", True), ("make bench", False)]
    assert [lang for lang, _, _ in blocks(page)] == ["bash", ""]
    assert MACHINE_PATH.search("from /work/shared/data") and not MACHINE_PATH.search("../shared/data and s/tmp/x")
    assert "exit-codes" in anchors("## Exit codes\n") and "a-b_c" in anchors("### `a` b_c!\n")


def test_the_plans_generator_writes_relative_paths():
    """benchmarks/results/plans/plans.md quoted a failed run's log with this machine's paths; the generator now
    writes them relative to the checkout."""
    from benchmarks.plans import ROOT, markdown

    run = {"teacher": "vit_cifar10", "recipe": "recipes/x.yaml", "exit_code": 4, "wall_s": 1.0,
           "error": f"error: {ROOT}/recipes/x.yaml missed", "stderr_tail": [f"evaluating on {ROOT.parent}/shared/t.zip"]}
    md = markdown({"machine": "m", "onnxruntime": "1", "torch": "2", "load_at_start": 0, "load_at_end": 0,
                   "total_s": 1, "applies": [run], "plans": []})
    assert "evaluating on ../shared/t.zip" in md and "`error: recipes/x.yaml missed`" in md
    assert not MACHINE_PATH.search(md.replace(str(ROOT.parent), "/work"))
