"""Why qk_merge / vo cannot run on a model's attention, read from its structure (no class names).

Attention modules are those holding a head count (`num_heads`). What stops each exact rewrite:
- RoPE (a forward taking `rope` / rotary / position embeddings): q and k are rotated per position between W_q, W_k
  and q.k, so W_q^T W_k has no position-free merged form. Values are not rotated: vo fold would stay exact.
- q/k norm (non-identity `q_norm` / `k_norm`): a nonlinear step between W_q, W_k and the product.
- a norm on the attention output before `proj` (EVA's sub-LN `norm`): W_v and W_o cannot fold through it.
- a relative position bias (a `relative_position*` parameter, a `rel_pos` child or argument): added after q.k, so
  both merges would stay exact, but blocks of that form are not mapped to the neutral block the passes rewrite.
"""
from __future__ import annotations

import inspect
import re

from torch import nn

_ROPE = re.compile(r"rope|rotary|freqs|position_embeddings", re.I)
_RELPOS = re.compile(r"rel_pos|relative_position", re.I)


def _attention(model: nn.Module) -> tuple[str, nn.Module] | None:
    return next(((n, m) for n, m in model.named_modules() if n and isinstance(getattr(m, "num_heads", None), int)
                 and any(isinstance(c, nn.Linear) for c in m.children())), None)


def _args(m: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return []


def _real(m: nn.Module, child: str) -> bool:
    c = getattr(m, child, None)
    return isinstance(c, nn.Module) and not isinstance(c, nn.Identity)


def obstacle(model: nn.Module, pass_name: str) -> str | None:
    """One clause saying why `pass_name` (qk_merge or vo) does not rewrite this model's attention, or None."""
    found = _attention(model)
    if found is None or pass_name not in ("qk_merge", "vo"):
        return None
    name, m = found
    where = f"its attention ({type(m).__name__} at {name})"
    rope = any(_ROPE.search(a) for a in _args(m))
    relpos = any(_RELPOS.search(a) for a in _args(m)) or any(_RELPOS.search(n) for n, _ in m.named_parameters()) \
        or any(_RELPOS.search(n) for n, _ in m.named_children())
    if pass_name == "qk_merge":
        if rope:
            return f"{where} rotates q and k by position (RoPE) before q.k, so W_q^T W_k has no position-free merged form"
        if _real(m, "q_norm") or _real(m, "k_norm"):
            return f"{where} normalises q and k (q/k norm) before q.k, a nonlinear step W_q^T W_k cannot pass"
    elif _real(m, "norm"):
        return f"{where} normalises the attention output before proj, so W_v and W_o cannot fold through it"
    if rope or relpos:
        bias = "RoPE rotates only q and k" if rope else "its relative position bias is added after q.k"
        return (f"{where}: {bias}, so {pass_name} would stay exact, but blocks of this form are not mapped to the "
                "neutral block the pass rewrites yet")
    return None
