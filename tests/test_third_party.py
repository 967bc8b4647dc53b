"""Networks compress was not built around, as their authors wrote them (tests/third_party: vit-pytorch's ViT,
SimpleViT and post-LayerNorm "keel" ViT, copied unchanged): loaded through `module:factory`, their attention and
MLP Linears found by structure, lowrank and width run, and each result exports with ONNX parity and replays."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from compress.adapters.generic import structural_layers
from compress.load.model import load
from compress.recipe import parse_recipe
from tests.test_sources import check_result, run

FACTORIES = ["lucidrains_vit", "lucidrains_simple_vit", "lucidrains_post_ln_vit"]


def _ckpt(tmp_path, factory):
    import third_party

    torch.manual_seed(0)
    m = getattr(third_party, factory)().eval()
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors", {"arch": f"third_party:{factory}", "img_size": 32}


@pytest.mark.parametrize("factory", FACTORIES)
def test_third_party_vits_take_lowrank_and_width_with_parity(tmp_path, factory):
    ckpt, spec = _ckpt(tmp_path, factory)
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    kinds = {}
    for name, kind in structural_layers(loaded.model, torch.zeros(1, 3, 32, 32)):
        kinds.setdefault(kind, []).append(name)
    # two blocks: q/k/v fused and the output projection per attention, two Linears per MLP, and the classifier
    assert len(kinds["attn"]) == 4 and len(kinds["mlp"]) == 4 and kinds["head"] == ["mlp_head" if "simple" not in
                                                                                     factory else "linear_head"]
    out, rep = run(tmp_path, ckpt, [{"lowrank": {"rank": 8, "layers": ["attn", "mlp"]}}], model=spec, name="lowrank")
    assert rep["passes"][0]["params"][1] < rep["passes"][0]["params"][0]
    check_result(out, rep, (3, 32, 32))
    out, rep = run(tmp_path, ckpt, [{"width": {"keep": 0.5, "multiple": 8}}], model=spec, name="width")
    p = rep["passes"][0]
    assert sorted(m["width"] for m in p["details"]["mlps"].values()) == [[64, 32], [64, 32]]
    check_result(out, rep, (3, 32, 32))
