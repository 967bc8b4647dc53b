"""torch's own transformer layers rebuilt as plain modules, so every pass can reach their Linear layers.

`nn.TransformerEncoder(Layer)` and `nn.MultiheadAttention` keep their projections as raw parameters
(`in_proj_weight`) or read `linear1.weight` for their fast path, so the layer probe leaves them out and
no pass rewrites them. Here each becomes the same computation written out: separate q, k, v Linears and
the out projection, the two LayerNorms, and the MLP as a Sequential (fc, activation, dropout, fc); no fast
path. Each rebuilt module is checked on the inputs it receives in a forward pass (within TOL of its scale);
one that differs, or that uses a feature written out here does not cover, is left as it was and named.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...adapters.base import set_module
from .common import random_input, rel_diff
from .user_blocks import split

TOL = 1e-5
KINDS = (nn.TransformerEncoder, nn.TransformerEncoderLayer, nn.MultiheadAttention)


def _mask(att: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Add a torch-style mask (bool: True = not attended; float: added) to scores of shape (b, h, n, s)."""
    if mask is None:
        return att
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=att.dtype, device=att.device).masked_fill(mask, float("-inf"))
    return att + mask.to(att.dtype)


class PlainMHA(nn.Module):
    """nn.MultiheadAttention written out: q, k, v, out_proj Linears; same call signature and returns."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads, self.batch_first, self.p = mha.num_heads, mha.batch_first, mha.dropout
        self.q, self.k, self.v = split(mha.in_proj_weight, mha.in_proj_bias, 3)
        out = mha.out_proj
        self.out_proj = nn.Linear(out.in_features, out.out_features, bias=out.bias is not None)
        self.out_proj.weight = out.weight  # the same Parameters: they keep your key for the save-back
        if out.bias is not None:
            self.out_proj.bias = out.bias

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1 if not self.batch_first else 0) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n, d = query.shape
        s, h = key.shape[1], self.num_heads
        q = self.q(query).view(b, n, h, d // h).transpose(1, 2)
        k = self.k(key).view(b, s, h, d // h).transpose(1, 2)
        v = self.v(value).view(b, s, h, d // h).transpose(1, 2)
        att = (q * (d // h) ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n, s, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            att = _mask(att, attn_mask if attn_mask.dim() == 2 else attn_mask.view(b, h, n, s))
        if key_padding_mask is not None:
            att = _mask(att, key_padding_mask.view(b, 1, 1, s))
        att = F.dropout(att.softmax(-1), self.p, self.training)
        out = self.out_proj((att @ v).transpose(1, 2).reshape(b, n, d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = (att.mean(1) if average_attn_weights else att) if need_weights else None
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
            weights = weights.squeeze(0) if weights is not None else None
        return out, weights


def _act(act) -> nn.Module | None:
    if isinstance(act, nn.Module):
        return act
    return {F.relu: nn.ReLU(), F.gelu: nn.GELU()}.get(act)


class PlainEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer (pre- or post-norm) written out; self_attn, norm1/2 and the MLP as modules."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.norm_first = layer.norm_first
        self.norm1, self.self_attn = layer.norm1, PlainMHA(layer.self_attn)
        self.mlp = nn.Sequential(layer.linear1, _act(layer.activation), layer.dropout, layer.linear2)
        self.norm2, self.dropout1, self.dropout2 = layer.norm2, layer.dropout1, layer.dropout2

    def _sa(self, x, mask, kpm, is_causal):
        return self.dropout1(self.self_attn(x, x, x, kpm, False, mask, is_causal=is_causal)[0])

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        if self.norm_first:
            x = x + self._sa(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self.dropout2(self.mlp(self.norm2(x)))
        x = self.norm1(x + self._sa(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self.dropout2(self.mlp(x)))


class PlainEncoder(nn.Module):
    """nn.TransformerEncoder: its layers in turn, then its final norm; no nested-tensor fast path."""

    def __init__(self, enc: nn.TransformerEncoder):
        super().__init__()
        self.layers = nn.ModuleList(PlainEncoderLayer(l) for l in enc.layers)
        self.norm = enc.norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        plain_call = mask is None and src_key_padding_mask is None and not is_causal
        for layer in self.layers:  # a layer the loader mapped to the neutral ViTBlock takes the tokens alone
            src = layer(src) if plain_call else layer(src, mask, src_key_padding_mask, bool(is_causal))
        return self.norm(src) if self.norm is not None else src


def _why_not(m: nn.Module) -> str | None:
    """Why `m` has no plain form here, or None."""
    if isinstance(m, nn.TransformerEncoder):
        return next((w for l in m.layers if (w := _why_not(l))), None)
    if isinstance(m, nn.TransformerEncoderLayer):
        if _act(m.activation) is None:
            return f"its activation {getattr(m.activation, '__name__', m.activation)!r} is not a module, relu or gelu"
        return _why_not(m.self_attn)
    if not m._qkv_same_embed_dim:
        return "its key/value sizes differ from embed_dim (kdim/vdim)"
    if m.bias_k is not None or m.add_zero_attn:
        return "it uses add_bias_kv or add_zero_attn"
    return None


def plain(m: nn.Module) -> nn.Module:
    return {nn.TransformerEncoder: PlainEncoder, nn.TransformerEncoderLayer: PlainEncoderLayer,
            nn.MultiheadAttention: PlainMHA}[type(m)](m)


def _targets(model: nn.Module) -> list[str]:
    """The outermost torch transformer modules (an encoder's layers and attention are rebuilt with it)."""
    out = []
    for n, m in model.named_modules():
        if type(m) in KINDS and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def _diff(ref, got) -> float:
    refs, gots = (ref, got) if isinstance(ref, tuple) else ((ref,), (got,))
    pairs = [(r, g) for r, g in zip(refs, gots) if r is not None or g is not None]
    if any(r is None or g is None for r, g in pairs):
        return float("inf")
    return max(rel_diff(r, g) for r, g in pairs)


def rebuild_torch_layers(model: nn.Module, input_size, only: list[str] | None = None) -> dict:
    """Replace torch's transformer modules in `model` by plain ones, in place. With `only` (a recorded run), those
    names without a check; else each is checked on its real input. Returns {rebuilt: [names], kept: [reasons]}."""
    names = _targets(model)
    if only is not None:
        for n in only:
            set_module(model, n, plain(model.get_submodule(n)))
        return {"rebuilt": list(only), "kept": []}
    if not names:
        return {"rebuilt": [], "kept": []}
    seen, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(
            lambda m, a, kw, n=n: seen.setdefault(n, (a, kw)), with_kwargs=True))
    try:
        with torch.no_grad():
            model(random_input(input_size))
    except Exception as e:  # noqa: BLE001 - the loader's own checks report a model that does not run
        return {"rebuilt": [], "kept": [f"{n} (the probe forward failed: {type(e).__name__})" for n in names]}
    finally:
        for h in hooks:
            h.remove()
    rebuilt, kept = [], []
    for n in names:
        old = model.get_submodule(n)
        why = _why_not(old) or (None if n in seen else "the forward never calls it")
        if why is None:
            new = plain(old).eval()
            args, kw = seen[n]
            try:
                with torch.no_grad():
                    d = _diff(old(*args, **kw), new(*args, **kw))
                why = None if d <= TOL else f"the plain form differs by {d:.1e} of the scale"
            except Exception as e:  # noqa: BLE001 - a call the plain form does not cover: keep torch's
                why = f"the plain form does not run in its place: {type(e).__name__}: {str(e).strip()[:80]}"
        if why is None:
            set_module(model, n, new)
            rebuilt.append(n)
        else:
            kept.append(f"{n} ({type(old).__name__}: {why})")
    return {"rebuilt": rebuilt, "kept": kept}
