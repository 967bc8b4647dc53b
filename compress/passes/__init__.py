"""Explicit registration: importing this package registers every shipped pass."""
from . import lowrank, mlp_strip, qk_merge, vo  # noqa: F401
