"""Explicit registration: importing this package registers every shipped pass."""
from . import attn_diffusion, crate, mlp_strip, qk_merge, vo  # noqa: F401
