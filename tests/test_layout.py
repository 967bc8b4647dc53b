"""The package's shape: no import cycle between modules (function-local imports count: they run too), and none
between the stage folders, so no stage imports the one that drives it."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "compress"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> the compress modules it imports anywhere in its text (a name imported from a package that is a
    module counts as that module)."""
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[:None if is_pkg else -1]
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            else:
                continue
            for name in names:
                while name not in mods and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod:
                    targets.add(name)
        graph[mod] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def stage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """compress.<stage>... -> the other stages (first-level folders or modules) it imports."""
    def stage(m):
        return m.split(".")[1] if "." in m else m
    out: dict[str, set[str]] = {}
    for m, ts in graph.items():
        out.setdefault(stage(m), set()).update(stage(t) for t in ts if stage(t) != stage(m))
    return out


def test_no_module_imports_itself_through_others():
    assert cycles(import_graph()) == []


def test_no_stage_imports_the_stage_that_drives_it():
    stages = stage_graph(import_graph())
    assert cycles(stages) == []
    assert stages["core"] == set(), "core/ is the floor: it imports no stage"
    for low in ("core", "adapters", "measure", "passes", "load", "export", "distill", "planner", "report"):
        assert not {"run", "cli", "api"} & stages[low], f"{low}/ imports its driver"


def test_the_checker_finds_a_cycle():
    """The check itself can fail: a made-up graph with a loop through three modules."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles(stage_graph({"compress.run.x": {"compress.core.y"}, "compress.core.y": {"compress.run.x"}})) \
        == [["core", "run"]]
