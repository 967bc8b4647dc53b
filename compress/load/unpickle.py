"""A pickle reader that builds tensors and inert values and nothing else: every other class becomes a placeholder.

Training scripts save their run's arguments (argparse.Namespace), config objects, enums and numpy
values beside the weights. torch.load(weights_only=True) refuses any global it does not know, and its
add_safe_globals would construct the real class (running that class's code). Here a class that is not
allowlisted is never imported: `find_class` hands back a fresh placeholder type named after it, which
records whatever the pickle passes to it. Nothing from a system module (os, subprocess, builtins, ...)
or from torch beyond its tensor machinery is accepted, and a placeholder holding a module's state
(`_modules`, `_parameters`) means a pickled nn.Module: both refused by the caller in its usual line.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import collections
import datetime
import decimal
import fractions
import pathlib
import pickle
import re
import sys
import uuid

import torch._weights_only_unpickler as _wo

# Inert standard types (their constructors only store values) that may be built for real.
INERT = {f"{t.__module__}.{t.__qualname__}": t for t in (
    argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
    datetime.datetime, datetime.date, datetime.time, datetime.timedelta, datetime.timezone, slice, frozenset, range,
    collections.defaultdict, collections.deque, decimal.Decimal, fractions.Fraction, uuid.UUID,
    list, dict, tuple, int, float, str, bool)}  # builtins: as defaultdict factories and plain conversions
STDLIB = set(sys.stdlib_module_names) | {"__builtin__", "torch", "numpy", "typing_extensions", "dill", "cloudpickle"}


class Placeholder:
    """Stands for a class that was not imported; keeps what the pickle gave it (never calls anything)."""

    _name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.__dict__["_args"], obj.__dict__["_state"], obj.__dict__["_items"] = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):  # a dict subclass's items
        self._items.append((key, value))

    def append(self, value):  # a list subclass's items
        self._items.append(value)

    def extend(self, values):
        self._items.extend(values)

    def __repr__(self):
        return f"<not loaded: {self._name}>"


def numpy_globals() -> list:
    """Numpy scalars and arrays that training scripts store beside the weights (`best_acc: np.float64`).

    Rebuilding them calls no user code (numpy's own constructors), so `weights_only` may allow them.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = [t for t in vars(getattr(np, "dtypes", object)).values() if isinstance(t, type) and issubclass(t, np.dtype)]
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def _allowed() -> dict:
    """torch's own weights_only allowlist (tensor rebuilding), the numpy value types, and INERT."""
    out = dict(_wo._get_allowed_globals())
    out.update({f"{g.__module__}.{g.__qualname__}": g for g in numpy_globals()})
    out.update(INERT)
    out["copyreg._reconstructor"] = _reconstructor
    return out


def _reconstructor(cls, base, state):
    """copyreg._reconstructor (protocol 0/1 objects) without calling base.__init__: only placeholders and INERT."""
    if isinstance(cls, type) and (issubclass(cls, Placeholder) or cls in INERT.values()):
        return object.__new__(cls) if base is object or issubclass(cls, Placeholder) else base.__new__(cls, state)
    raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {getattr(cls, '__module__', '?')}.{getattr(cls, '__name__', cls)}")


class Restricted(pickle.Unpickler):
    allowed: dict = {}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.placeholders: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__, copy_reg) of protocols < 3, as the default find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in self.allowed:
            return self.allowed[full]
        if module.partition(".")[0] in STDLIB:  # an inert config class never lives there; code-running callables do
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full}")
        if full not in self.placeholders:
            self.placeholders[full] = type(name, (Placeholder,), {"_name": full, "__module__": "compress.load.unpickle"})
        return self.placeholders[full]


def _make_module():
    seen: dict[str, type] = {}

    class Unpickler(Restricted):
        allowed = _allowed()

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.placeholders = seen  # shared: torch builds several unpicklers for one file

    mod = type("RestrictedPickle", (), {"Unpickler": Unpickler, "__name__": "compress.load.unpickle",
                                        "load": staticmethod(lambda f, **k: Unpickler(f, **k).load())})
    return mod, seen


def _walk(obj, depth: int = 0):
    """Every placeholder inside `obj` (containers and placeholders' own contents)."""
    if depth > 20:
        return
    if isinstance(obj, Placeholder):
        yield obj
        for part in (obj._args, obj._state, obj._items):
            yield from _walk(part, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _walk(v, depth + 1)
    elif isinstance(obj, argparse.Namespace):
        yield from _walk(vars(obj), depth + 1)


def load(path, refuse) -> tuple[object, list[str]]:
    """(the checkpoint's content, names of the classes that became placeholders). `refuse(name)` raises the
    caller's one-line refusal for a global that cannot be allowed or a pickled nn.Module."""
    import torch

    mod, seen = _make_module()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=mod)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        refuse(found.group(1) if found else None)
    for p in _walk(obj):
        state = p._state[0] if isinstance(p._state, tuple) and p._state else p._state
        if isinstance(state, dict) and {"_modules", "_parameters"} & set(state):
            refuse(p._name)  # a whole pickled nn.Module: its class would have to run to be used
    return obj, sorted(seen)
