"""torch's own transformer layers (nn.TransformerEncoder(Layer), nn.MultiheadAttention) rebuilt as plain modules."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.load.model import load
from compress.load.sources.torch_layers import PlainEncoder, rebuild_torch_layers
from compress.recipe import parse_recipe
from tests.test_sources import check_result, jitter, run

LOWRANK = [{"lowrank": {"rank": 8, "layers": ["attn", "mlp"]}}]


@pytest.mark.parametrize("kw", [{}, {"norm_first": False}, {"batch_first": False, "activation": "relu"},
                                {"norm_first": False, "batch_first": False}])
def test_rebuilt_encoder_matches_torch(kw):
    import user_models

    m = jitter(user_models.torch_vit(**kw))
    ref = copy.deepcopy(m)
    got = rebuild_torch_layers(m, (3, 16, 16))
    assert got == {"rebuilt": ["encoder"], "kept": []} and isinstance(m.encoder, PlainEncoder)
    assert not any(isinstance(x, nn.MultiheadAttention) for x in m.modules())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
        tokens = torch.randn(3, 4, 16) if kw.get("batch_first", True) else torch.randn(4, 3, 16)
        pad = torch.tensor([[False, False, True, True]] * 3)
        for call in ({"src_key_padding_mask": pad}, {"mask": nn.Transformer.generate_square_subsequent_mask(4), "is_causal": True}):
            torch.testing.assert_close(m.encoder(tokens, **call), ref.encoder(tokens, **call), atol=1e-5, rtol=1e-5)


def test_attention_it_cannot_write_out_is_kept_and_named():
    class CrossDims(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 8, 8)
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return self.head(self.attn(t, t[..., :8], t[..., 8:])[0].mean(1))

    m = CrossDims().eval()
    got = rebuild_torch_layers(m, (3, 16, 16))
    assert got["rebuilt"] == [] and "kdim/vdim" in got["kept"][0] and isinstance(m.attn, nn.MultiheadAttention)


def _ckpt(tmp_path, factory, kw=None):
    import user_models

    m = jitter(getattr(user_models, factory)(**(kw or {})))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors", m, {"arch": f"user_models:{factory}", "kwargs": kw or {}, "img_size": 16}


def test_torch_encoder_vit_lowrank_width_export_and_save_back(tmp_path):
    """Before: lowrank found no attn/mlp layers (the fast path reads them); now every pass reaches them."""
    ckpt, m, spec = _ckpt(tmp_path, "torch_vit")
    for name, passes in (("lowrank", LOWRANK), ("width", [{"width": {"keep": 0.5}}])):
        out, rep = run(tmp_path, ckpt, passes, model=spec, name=name)
        assert rep["passes"][0]["params"][1] < rep["passes"][0]["params"][0]
        check_result(out, rep, (3, 16, 16))  # ONNX parity and load_compressed's replay
    assert "encoder rebuilt as plain modules" in rep["source"]["torch_layers"]
    out, rep = run(tmp_path, ckpt, [], model=spec, name="plain", onnx=False)
    import user_models

    back = user_models.torch_vit().eval()  # saved back in torch's own keys (in_proj_weight ...)
    back.load_state_dict(load_file(str(out / "model.user.safetensors")))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory,kw", [("torch_vit", {"norm_first": False, "batch_first": False}), ("tuple_vit", {})])
def test_post_norm_and_tuple_blocks_take_lowrank_and_width(tmp_path, factory, kw):
    """Blocks with no neutral form (post-norm, sequence-first, returning tuples) still expose plain Linears:
    lowrank factorises them; width narrows their MLPs (found by structure, checked independent), says the heads
    stay whole, and the result exports with parity and replays."""
    ckpt, _, spec = _ckpt(tmp_path, factory, kw)
    out, rep = run(tmp_path, ckpt, LOWRANK, model=spec)
    assert rep["passes"][0]["params"][1] < rep["passes"][0]["params"][0]
    check_result(out, rep, (3, 16, 16))
    out, rep = run(tmp_path, ckpt, [{"width": {"keep": 0.5, "multiple": 4}}], model=spec, name="width")
    p = rep["passes"][0]
    assert p["params"][1] < p["params"][0] and len(p["details"]["mlps"]) == 2
    assert all(m["width"] == [32, 16] for m in p["details"]["mlps"].values())
    assert any("qk, vo kept at full width" in c for c in p["changes"]), p["changes"]
    check_result(out, rep, (3, 16, 16))
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    assert loaded.source["base"]["conversion"]["torch_layers"] == (["encoder"] if factory == "torch_vit"
                                                                   else ["blocks.0.attn", "blocks.1.attn"])
