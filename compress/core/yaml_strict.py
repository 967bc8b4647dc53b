"""The one YAML loader: yaml.safe_load, except that a key given twice in one mapping is an error.

PyYAML keeps the last of two equal keys without a word: `passes: [...]` and, further down, `passes: []`
runs no pass at all and exits 0. Recipes and zoo files are read here, so that never passes silently.
"""
from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_VALUES = 100_000  # values in the document once every alias is expanded: recipes hold hundreds  # `<<: *base`: keys that follow it override the merged ones on purpose


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds one key twice: `key` is its path from the top ('report.latency.threads', 'passes[0].x')."""

    def __init__(self, key: str, first: int, second: int):
        where = f"twice on line {first}" if first == second else f"lines {first} and {second}"
        super().__init__(f"duplicate key '{key}' ({where})")
        self.key, self.first, self.second = key, first, second


class AliasBombError(yaml.YAMLError):
    """Aliases (`*name`) expand the document past MAX_VALUES values: a 1 KB "billion laughs" is gigabytes once any
    reader (a validator, an error message, json.dumps) walks it."""


class StrictLoader(yaml.SafeLoader):
    """SafeLoader whose construct_mapping refuses a key seen before in the same mapping, and that refuses a
    document whose aliases expand it past MAX_VALUES values (counted on the node graph, before building it)."""

    def construct_document(self, node):
        size = _expanded_size(node)
        if size > MAX_VALUES:
            raise AliasBombError(f"its aliases (*name) expand it to more than {MAX_VALUES:,} values; write the values "
                                 "out, or repeat them without nesting aliases inside aliases")
        self._paths = _paths(node)  # each mapping node's path from the top, for the error line
        try:
            return super().construct_document(node)
        finally:
            self._paths = {}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:  # as written: before flatten_mapping folds `<<` merges in
                if key_node.tag == MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = getattr(self, "_paths", {}).get(id(node), "")
                    raise DuplicateKeyError(f"{where}.{key}" if where else str(key), seen[key], line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root) -> int:
    """How many values the document holds with every alias expanded: a node reached twice counts twice (its size
    memoised, so a deep bomb costs as many steps as it has nodes, not values). Stops counting at MAX_VALUES + 1."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()  # collections whose children are being counted: reaching one again is a cycle
    todo = [(root, False)]
    while todo:
        node, children_done = todo.pop()
        if id(node) in sizes:
            continue
        kids = ([v for kv in node.value for v in kv] if isinstance(node, yaml.MappingNode)
                else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if children_done or not kids:
            open_.discard(id(node))
            sizes[id(node)] = min(MAX_VALUES + 1, 1 + sum(sizes.get(id(k), 1) for k in kids))
            continue
        if id(node) in open_:  # a recursive alias (`&a [*a]`): endless once expanded
            return MAX_VALUES + 1
        open_.add(id(node))
        todo.append((node, True))
        todo += [(k, False) for k in kids if id(k) not in sizes]
    return sizes[id(root)]


def _paths(root) -> dict[int, str]:
    """id(mapping node) -> its dotted path ('' for the top, 'passes[0].mlp_strip' inside a list)."""
    out, todo, done = {}, [(root, "")], set()
    while todo:
        node, path = todo.pop()
        if id(node) in done:  # an alias refers to a node already walked
            continue
        done.add(id(node))
        if isinstance(node, yaml.MappingNode):
            out[id(node)] = path
            for k, v in node.value:
                name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                todo.append((v, f"{path}.{name}" if path else str(name)))
        elif isinstance(node, yaml.SequenceNode):
            todo += [(v, f"{path}[{i}]") for i, v in enumerate(node.value)]
    return out


def load(text: str) -> Any:
    """yaml.safe_load(text), refusing duplicate keys (DuplicateKeyError, a yaml.YAMLError)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
