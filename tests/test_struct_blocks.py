"""qk_merge / vo on timm Beit, VisionTransformerRelPos and EVA, whose blocks no adapter names: their blocks are mapped
to the neutral block by structure (compress/adapters/vit_struct.py), the relative position bias and RoPE carried over.
The exact forms stay within the pipeline's float64 check; what truly stops a rewrite (RoPE for qk_merge, a q/k norm,
a norm before proj) is one line (exit 2) that says so."""
from __future__ import annotations

import pytest
import timm
import torch

from compress.adapters import detect
from compress.core.errors import InputError
from compress.load.model import load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from tests.conftest import save_timm_dir

SMALL = {"depth": 2, "embed_dim": 64, "num_heads": 4, "num_classes": 5}
PATCH8 = {**SMALL, "img_size": 32, "patch_size": 8}
FAMILIES = {"beit_base_patch16_224": {**PATCH8, "init_values": 0.1},  # layer scale as bare gamma_1/gamma_2
            "vit_relpos_small_patch16_224": PATCH8,  # RelPosMlp bias
            "vit_srelpos_small_patch16_224": PATCH8,  # one bias shared by all blocks, passed in by the model
            "eva02_tiny_patch14_224": {**SMALL, "img_size": 28}}  # RoPE, SwiGLU
QK = {"qk_merge": {"mode": "exact", "allow_growth": True}}
VO = {"vo": {"mode": "fold", "allow_growth": True}}


def _folder(tmp_path, arch, args=None):
    args = args or FAMILIES[arch]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **args).eval()
    with torch.no_grad():  # random, not timm's zero init: a bias table of zeros would not show a lost bias
        for n, p in model.named_parameters():
            if "relative_position" in n or "gamma" in n:
                p.normal_(0, 0.5)
    return save_timm_dir(model, arch, args, tmp_path / "m")


def _run(tmp_path, folder, step):
    recipe = parse_recipe({"version": 1, "passes": [step], "report": {"latency": None}, "calibration": {"data": "random"}})
    return apply(recipe, str(folder), tmp_path / "out", log=lambda *_: None)


@pytest.mark.parametrize("arch,step", [(a, s) for a in FAMILIES for s in (QK, VO) if not (a.startswith("eva") and s is QK)],
                         ids=lambda x: x if isinstance(x, str) else next(iter(x)))
def test_exact_attention_pass_runs_on_blocks_mapped_by_structure(tmp_path, arch, step):
    folder = _folder(tmp_path, arch)
    record = _run(tmp_path, folder, step)
    (entry,) = [e for e in record["passes"] if "pass" in e]
    assert entry["exact"] and entry["verified"]["rel_diff"] <= 1e-5, entry  # the pipeline's own float64 check
    assert entry["details"]["blocks"] == [0, 1]
    rebuilt = load_compressed(tmp_path / "out")  # the structure replays from the recipe on the original class
    s = FAMILIES[arch]["img_size"]
    x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    teacher = timm.create_model(arch, pretrained=False, **FAMILIES[arch]).eval()
    from safetensors.torch import load_file

    teacher.load_state_dict(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), teacher(x), atol=1e-4)


def test_rope_stops_qk_merge_in_one_line(tmp_path):
    folder = _folder(tmp_path, "eva02_tiny_patch14_224")
    with pytest.raises(InputError) as e:
        _run(tmp_path, folder, QK)
    line = str(e.value)
    assert "\n" not in line and not (tmp_path / "out").exists()
    assert "RoPE" in line and "no position-free merged form" in line and "lowrank" in line


@pytest.mark.parametrize("arch,args,step,words", [
    ("eva02_tiny_patch14_224", {**FAMILIES["eva02_tiny_patch14_224"], "scale_attn_inner": True}, VO, "before proj (sub-LN)"),
    ("vit_relpos_small_patch16_224", {**PATCH8, "qk_norm": True}, QK, "q/k norm"),
    ("vit_small_patch16_18x2_224", {**PATCH8, "embed_dim": 64}, QK, "has no norm1, attn, norm2, mlp"),
], ids=["sub-ln", "qk-norm", "parallel-blocks"])
def test_what_stops_the_mapping_is_named(tmp_path, arch, args, step, words):
    folder = _folder(tmp_path, arch, args)
    with pytest.raises(InputError) as e:
        _run(tmp_path, folder, step)
    line = str(e.value)
    assert "\n" not in line and words in line and "module types" in line and "lowrank" in line
    assert not (tmp_path / "out").exists()


def test_a_post_norm_block_is_not_mapped_as_pre_norm():
    """Same attribute names, other wiring (timm's ResPostRelPosBlock: x + norm1(attn(x))): the numerical check
    refuses it and leaves the model as it was."""
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, **PATCH8, block_fn=timm.models.vision_transformer_relpos.ResPostRelPosBlock).eval()
    adapter = detect(model)
    before = [type(b) for b in model.blocks]
    with pytest.raises(InputError, match="wired otherwise"):
        adapter.vit_blocks(model)
    assert [type(b) for b in model.blocks] == before
