"""qk_merge / vo on timm Beit, VisionTransformerRelPos and Eva: each refuses in one line (exit 2) saying what in the
attention stops it, read from the structure (RoPE, q/k norm, a norm before proj, a relative position bias)."""
from __future__ import annotations

import pytest
import timm
import torch

from compress.attn_obstacles import obstacle
from compress.errors import InputError
from compress.pipeline import apply
from compress.recipe import parse_recipe
from tests.conftest import save_timm_dir

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 5}
FAMILIES = {"beit_base_patch16_224": ({**SMALL, "img_size": 32, "patch_size": 8}, "relative position bias"),
            "vit_relpos_small_patch16_224": ({**SMALL, "img_size": 32, "patch_size": 8}, "relative position bias"),
            "eva02_tiny_patch14_224": ({**SMALL, "img_size": 28}, "RoPE")}


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("step", [{"qk_merge": {"mode": "exact"}}, {"vo": {"mode": "fold"}}], ids=["qk_merge", "vo"])
def test_exact_attention_pass_refuses_in_one_line_with_the_reason(tmp_path, arch, step):
    args, reason = FAMILIES[arch]
    torch.manual_seed(0)
    folder = save_timm_dir(timm.create_model(arch, pretrained=False, **args).eval(), arch, args, tmp_path / "m")
    recipe = parse_recipe({"version": 1, "passes": [step], "report": {"latency": None}})
    with pytest.raises(InputError) as e:
        apply(recipe, str(folder), tmp_path / "out", log=lambda *_: None)
    line = str(e.value)
    assert "\n" not in line and not (tmp_path / "out").exists()
    assert reason in line and "blocks.0.attn" in line and "passes that apply: lowrank" in line
    rope_qk = arch.startswith("eva") and "qk_merge" in step
    # RoPE rotates q and k: no merged form at all; everywhere else the rewrite would be exact but is not mapped yet
    assert ("no position-free merged form" in line) == rope_qk
    assert ("would stay exact" in line) == (not rope_qk)


def test_norms_inside_the_attention_are_named():
    """q/k norm stops qk_merge; a norm on the attention output before proj (EVA's sub-LN) stops vo."""
    qk = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, qk_norm=True, img_size=32)
    assert "q/k norm" in obstacle(qk, "qk_merge") and obstacle(qk, "vo") is None
    sub = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28, scale_attn_inner=True)
    assert "before proj" in obstacle(sub, "vo")
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    assert obstacle(plain, "qk_merge") is None and obstacle(plain, "vo") is None
