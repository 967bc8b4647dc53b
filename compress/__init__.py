"""compress: turn pretrained ViT/ResNet checkpoints into smaller, faster models, verified.

The Python API (docs/python-api.md) is loaded on first use (PEP 562), so `import compress` stays cheap and imports
neither torch nor the CLI: `compress.apply`, `compress.plan`, `compress.inspect`, `compress.verify`,
`compress.load_compressed`, `compress.load_recipe`, `compress.Recipe` and the errors (`compress.CompressError`, ...).
"""
from .core import offline  # noqa: F401 - before anything imports onnxruntime: no telemetry, no network
from .core.version import __version__  # noqa: F401

_API = ("apply", "plan", "inspect", "verify", "load_compressed", "load_recipe", "Recipe", "CompressError",
        "InputError", "VerificationError", "GateError", "TargetError")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api

        value = getattr(api, name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))
