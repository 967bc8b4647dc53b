"""Networks compress was not built around, as their authors wrote them (tests/third_party, copied unchanged:
vit-pytorch's ViT, SimpleViT and post-LayerNorm "keel" ViT; its efficient.py ViT around torch's own
nn.TransformerEncoder, pre- and post-LayerNorm; its SimpleViT with value residual, whose attention returns a tuple):
loaded through `module:factory`, their attention and MLP Linears found by structure, lowrank and width run, and each
result exports with ONNX parity and replays."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from compress.adapters.generic import structural_layers
from compress.load.model import load
from compress.recipe import parse_recipe
from tests.test_sources import check_result, run

# per model, what structure finds in its two blocks: attention Linears, MLP Linears, and the classifier
LAYERS = {
    # q/k/v fused and the output projection per attention, two Linears per MLP
    "lucidrains_vit": (4, 4, ["mlp_head"]),
    "lucidrains_simple_vit": (4, 4, ["linear_head"]),
    "lucidrains_post_ln_vit": (4, 4, ["mlp_head"]),
    # efficient.py's ViT around torch's nn.TransformerEncoder: load rebuilds torch's layers as plain modules
    # (compress/load/sources/torch_layers.py; torch keeps q/k/v in in_proj_weight and reads linear1.weight for its
    # fast path). Pre-LayerNorm layers then map to the neutral ViT block: q, k (score), v, proj (value) per attention
    "torch_encoder_vit": (8, 4, ["mlp_head.1"]),
    # post-LayerNorm (torch's default) layers stay PlainEncoderLayer: self_attn.q/k/v/out_proj per attention
    "torch_encoder_post_ln_vit": (8, 4, ["mlp_head.1"]),
    # to_qkv and to_out per attention, and the second layer's value-residual gate (to_residual_mix: Linear(dim, heads))
    "lucidrains_value_residual_vit": (5, 4, ["linear_head"]),
}
# the widths width leaves, [full, kept], as it reports them: `mlps` where it narrows the structural MLPs of blocks
# left as written; `groups` by kind where the blocks mapped to the neutral ViT form (q.k and v/proj per head, too)
WIDTHS = {f: {"mlps": [[64, 32], [64, 32]]} for f in LAYERS}
WIDTHS["torch_encoder_vit"] = {"groups": {"qk": [[16, 8], [16, 8]], "vo": [[16, 8], [16, 8]],
                                          "mlp": [[64, 32], [64, 32]]}}
FACTORIES = list(LAYERS)


def _ckpt(tmp_path, factory):
    import third_party

    torch.manual_seed(0)
    m = getattr(third_party, factory)().eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors", {"arch": f"third_party:{factory}", "img_size": 32}


@pytest.mark.parametrize("factory", FACTORIES)
def test_third_party_layers_found_by_structure(tmp_path, factory):
    ckpt, spec = _ckpt(tmp_path, factory)
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    kinds = {}
    for name, kind in structural_layers(loaded.model, torch.zeros(1, 3, 32, 32)):
        kinds.setdefault(kind, []).append(name)
    attn, mlp, head = LAYERS[factory]
    assert len(kinds.get("attn", [])) == attn and len(kinds.get("mlp", [])) == mlp and kinds.get("head") == head


@pytest.mark.parametrize("factory", FACTORIES)
def test_third_party_vits_take_lowrank_with_parity(tmp_path, factory):
    ckpt, spec = _ckpt(tmp_path, factory)
    out, rep = run(tmp_path, ckpt, [{"lowrank": {"rank": 8, "layers": ["attn", "mlp"]}}], model=spec, name="lowrank")
    assert rep["passes"][0]["params"][1] < rep["passes"][0]["params"][0]
    check_result(out, rep, (3, 32, 32))


@pytest.mark.parametrize("factory", FACTORIES)
def test_third_party_vits_take_width_with_parity(tmp_path, factory):
    ckpt, spec = _ckpt(tmp_path, factory)
    out, rep = run(tmp_path, ckpt, [{"width": {"keep": 0.5, "multiple": 8}}], model=spec, name="width")
    p, want = rep["passes"][0], WIDTHS[factory]
    if "mlps" in want:
        assert sorted(m["width"] for m in p["details"]["mlps"].values()) == want["mlps"]
    else:
        got = {}
        for g in p["details"]["groups"].values():
            got.setdefault(g["kind"], []).append(g["width"])
        assert {k: sorted(v) for k, v in got.items()} == want["groups"]
    check_result(out, rep, (3, 32, 32))
