"""The README's Commands block is the CLI as it is; no tracked file holds merge-conflict markers.

The block is the second thing a newcomer reads: a command or option shown there that the CLI does
not know fails the first command they copy. Checked against the typer app itself (its click commands),
not against a list kept here.
"""
from __future__ import annotations

import re
import subprocess

import pytest
import typer

from compress.cli import app
from tests.conftest import REPO

OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


def commands_block(text: str) -> list[str]:
    """The command lines of the first ``` block under '## Commands', continuation lines joined, comments dropped."""
    section = text.split("\n## Commands\n", 1)[1]
    block = section.split("```", 2)[1].removeprefix("text\n")  # a synopsis, not commands to run: tests/test_docs.py
    lines: list[str] = []
    for raw in block.splitlines():
        line = re.sub(r"\s#\s.*$", "", raw).rstrip()  # '   # what it does'
        if not line.strip():
            continue
        if raw[:1].isspace() and lines:  # an indented line continues the command above
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def is_group(cmd) -> bool:  # typer vendors its own click: no isinstance against the click package
    return hasattr(cmd, "commands")


def options(cmd) -> list:
    return [p for p in cmd.params if p.param_type_name == "option"]


def resolve(root, words: list[str]) -> tuple:
    """The leaf command named by the leading words ('runtime prepare'), and the words after it."""
    cmd = root
    while is_group(cmd) and words and words[0] in cmd.commands:
        cmd, words = cmd.commands[words[0]], words[1:]
    return cmd, words


def leaves(cmd, path: tuple = ()) -> list[tuple]:
    if is_group(cmd):
        return [leaf for name, sub in cmd.commands.items() for leaf in leaves(sub, (*path, name))]
    return [path]


ROOT = typer.main.get_command(app)
LINES = commands_block((REPO / "README.md").read_text())


def arguments_shown(cmd, rest: list[str]) -> int:
    """Words outside [...] that are neither an option nor an option's value: the arguments the line passes."""
    words, n = re.sub(r"\[[^\]]*\]", " ", " ".join(rest)).split(), 0
    takes_value = {o for p in options(cmd) if not p.is_flag for o in p.opts}
    skip = False
    for w in words:
        if skip or w == "...":
            skip = False
            continue
        if w.startswith("-"):
            skip = w in takes_value
            continue
        n += 1
    return n


def test_commands_block_shows_every_command():
    assert len(LINES) >= 8 and all(line.startswith("compress ") for line in LINES), LINES
    shown = {resolve(ROOT, line.split()[1:])[0] for line in LINES}
    missing = [" ".join(path) for path in leaves(ROOT) if resolve(ROOT, list(path))[0] not in shown]
    assert missing == [], f"commands the README's Commands block does not show: {missing}"


@pytest.mark.parametrize("line", LINES, ids=[" ".join(line.split()[1:3]) for line in LINES])
def test_readme_command_is_real(line):
    cmd, rest = resolve(ROOT, line.split()[1:])
    assert cmd is not ROOT and not is_group(cmd), f"{line!r}: no such command"
    known = {o for p in options(cmd) for o in (*p.opts, *p.secondary_opts)}
    for opt in OPTION.findall(" ".join(rest)):
        assert opt in known, f"{line!r}: {opt} is not an option of that command (it has {sorted(known)})"
    required = [p.name for p in cmd.params if p.param_type_name == "argument" and p.required]
    assert arguments_shown(cmd, rest) >= len(required), f"{line!r}: does not show the required arguments {required}"


def test_commands_block_parser_catches_a_wrong_option():
    """Control: the checks above fail for an option the command lacks and for a missing argument."""
    cmd, rest = resolve(ROOT, "compress verify OUT [--imagez N]".split()[1:])
    known = {o for p in cmd.params for o in p.opts}
    assert OPTION.findall(" ".join(rest)) == ["--imagez"] and "--imagez" not in known
    cmd, rest = resolve(ROOT, "compress apply RECIPE [-o OUT]".split()[1:])
    assert cmd.name == "apply" and arguments_shown(cmd, rest) == 1  # apply requires 2
    assert resolve(ROOT, ["runtime", "prepare", "[1.16]"])[0].name == "prepare"


def test_no_tracked_file_holds_conflict_markers():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    starts = ("<" * 7 + " ", ">" * 7 + " ")  # spelt out here, so this file holds none itself
    found = []
    for name in filter(None, files.decode().split("\0")):
        path = REPO / name
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # binary
            continue
        found += [f"{name}:{i}" for i, line in enumerate(text.splitlines(), 1) if line.startswith(starts)]
    assert found == [], f"merge-conflict markers in {found}"
