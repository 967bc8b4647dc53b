"""Explicit registration: importing this package registers every shipped pass."""
from . import attn_diffusion, crate, lowrank, mlp_strip, qk_merge, tie_rowcol, token_merge, vo, width  # noqa: F401
