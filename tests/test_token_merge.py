"""token_merge (ToMe): exact at r = 0, merges the pairs a hand-made input makes most similar, weighs merged tokens
by size, exports with parity on both runtimes (fp16 and int8 too), replays through load_compressed."""
from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import timm
import torch

from compress.adapters import detect
from compress.core.errors import InputError
from compress.core.merging import MergingBlock, bipartite_match, merge_matrix, merge_wavg
from compress.core.registry import PassContext
from compress.export import runtimes
from compress.load.model import load_compressed
from compress.measure.metrics import count_flops, logits64
from compress.passes.qk_merge import QKMergeConfig, qk_merge
from compress.passes.token_merge import TokenMergeConfig, token_merge
from compress.recipe import load_recipe
from compress.run.pipeline import apply
from tests.conftest import make_image_zip, save_timm_dir, spread_weights, tiny_vit_args


def vit65(seed: int = 0, depth: int = 3, arch: str = "vit_tiny_patch16_224", **extra):
    """A seeded timm ViT with 64 patches + prefix tokens (32 px, patch 4), fan-in scaled like conftest.tiny_vit."""
    args = {**tiny_vit_args(heads=3, depth=depth), "img_size": 32, "patch_size": 4, **extra}
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, **args)
    return spread_weights(m), args


def _apply(model, cfg, fn=token_merge):
    return fn(model, detect(model), cfg, PassContext(None)).model.eval()


def test_r0_is_exact_and_declared_so():
    teacher, _ = vit65(depth=3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for cfg in (TokenMergeConfig(r=0), TokenMergeConfig(schedule=[0, 0, 0])):
        assert cfg.is_exact()
        student = _apply(copy.deepcopy(teacher), cfg)
        assert all(isinstance(b, MergingBlock) for b in student.blocks)
        ref, out = logits64(teacher, x), logits64(student, x)
        assert float((ref - out).abs().max() / ref.abs().max()) <= 1e-9
    assert not TokenMergeConfig(r=1).is_exact()
    merged = _apply(copy.deepcopy(teacher), TokenMergeConfig(r=4))
    assert float((logits64(teacher, x) - logits64(merged, x)).abs().max()) > 1e-3  # r > 0 does change the function


def test_hand_made_input_merges_its_most_similar_pairs():
    """prefix 1; after it A = positions 1, 3, 5, 7 and B = 2, 4, 6, 8. A1 (pos 3) is B3 (pos 8) up to a little noise,
    A0 (pos 1) is close to B0 (pos 2), the rest are orthogonal; the prefix token equals B1 and is never merged."""
    e = torch.eye(8)
    rows = [e[1], e[0], 0.8 * e[0] + 0.6 * e[7], e[2], e[1], e[3], e[4], e[5], e[2] + 0.01 * e[6]]
    metric = torch.stack(rows).unsqueeze(0)  # (1, 9, 8)
    x = torch.arange(9 * 2, dtype=torch.float32).view(1, 9, 2)
    unm, src, dst = bipartite_match(metric, 1, prefix=1)
    assert src.tolist() == [[1]] and dst.tolist() == [[3]]  # A1 -> B3: cosine 0.99995, the best
    assert sorted(unm.tolist()[0]) == [0, 2, 3]
    out, size = merge_wavg(x, None, merge_matrix((unm, src, dst), 9, prefix=1))
    assert out.shape == (1, 8, 2) and size.squeeze(-1).tolist() == [[1, 1, 1, 1, 1, 1, 1, 2]]
    assert torch.equal(out[0, 0], x[0, 0])  # the prefix first, untouched
    assert torch.allclose(out[0, -1], (x[0, 3] + x[0, 8]) / 2)  # A1 and B3 averaged into B3's place
    idx = bipartite_match(metric, 2, prefix=1)
    assert idx[1].tolist() == [[1, 0]] and idx[2].tolist() == [[3, 0]]  # then A0 -> B0 (cosine 0.8)
    every = merge_matrix(bipartite_match(metric, 4, prefix=1), 9, prefix=1)  # all of A merged: the prefix stays
    assert every.shape == (1, 5, 9) and every[0, 0, 0] == 1 and every.sum() == 9
    # sizes weigh the average: B3 already standing for 3 tokens pulls the merge 3:1 toward itself
    sizes = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 3]).view(1, 9, 1)
    out2, size2 = merge_wavg(x, sizes, merge_matrix((unm, src, dst), 9, prefix=1))
    assert torch.allclose(out2[0, -1], (x[0, 3] + 3 * x[0, 8]) / 4) and float(size2[0, -1]) == 4


def test_proportional_attention_makes_merging_a_duplicate_exact():
    """Two identical tokens stay identical through a block; merged into one of size 2, proportional attention (log 2
    on its logit) gives every other token exactly the attention it had before: the class output does not move."""
    model, _ = vit65(depth=2)
    blocks = detect(model).vit_blocks(model)
    x = torch.randn(2, 65, 24, generator=torch.Generator().manual_seed(3))
    x[:, 2] = x[:, 1]  # A0 == B0: cosine 1, the best match in every block
    plain = copy.deepcopy(blocks)
    student = _apply(copy.deepcopy(model), TokenMergeConfig(schedule=[1, 0]))
    with torch.no_grad():
        ref = plain[1](plain[0](x))
        out = student.blocks[1](student.blocks[0](x))
    assert out.shape == (2, 64, 24)
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-5)
    assert torch.allclose(out[:, -32], ref[:, 2], atol=1e-5)  # B0, which took A0, sits first among the B tokens


def test_target_schedule_counts_and_refusals():
    teacher, _ = vit65(depth=4)
    f0 = count_flops(teacher, (3, 32, 32))
    cut = _apply(copy.deepcopy(teacher), TokenMergeConfig(target=0.5))
    share = count_flops(cut, (3, 32, 32)) / f0
    assert 0.42 <= share <= 0.5
    s = copy.deepcopy(teacher)
    res = token_merge(s, detect(s), TokenMergeConfig(r=40, blocks=[1, 2]), PassContext(None))
    assert res.details["r"] == [0, 32, 16, 0] and res.details["tokens"] == [65, 33, 17, 17]  # clamped to half
    assert "tokens after each block: [65, 33, 17, 17]" in res.changes[-1]
    with pytest.raises(ValueError, match="exactly one of r"):
        TokenMergeConfig(r=2, target=0.5)
    with pytest.raises(InputError, match="schedule lists 2 values; this model has 4 blocks"):
        _apply(copy.deepcopy(teacher), TokenMergeConfig(schedule=[1, 1]))
    merged_qk = _apply(copy.deepcopy(teacher), QKMergeConfig(allow_growth=True), fn=qk_merge)
    with pytest.raises(InputError, match="block 0 computes its attention scores with MergedQK.*before qk_merge"):
        _apply(merged_qk, TokenMergeConfig(r=2))


def test_distilled_deit_keeps_both_prefix_tokens():
    model, _ = vit65(depth=2, arch="deit_tiny_distilled_patch16_224")
    student = _apply(copy.deepcopy(model), TokenMergeConfig(r=8))
    assert [b.prefix for b in student.blocks] == [2, 2]
    with torch.no_grad():
        assert student(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_export_parity_on_both_runtimes_replay_and_report(tmp_path):
    model, args = vit65(depth=3)
    ckpt = save_timm_dir(model, "vit_tiny_patch16_224", args, tmp_path / "vit")
    data = make_image_zip(tmp_path / "img.zip", size=32, corrupt=0)
    # fp16: k comes out of an fp16 MatMul, so a near-tie in the matching may flip and move the logits by ~1e-2 of
    # their scale on a random model; the file is still checked, against a looser bound
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\npasses:\n  - token_merge: {{target: 0.6}}\ncalibration: {{data: {data}, images: 16}}\n"
                      "export: {precision: [fp32, fp16], fp16_tol: 0.05, quantize: [int8_dynamic, int8_static], "
                      "int8_min_agreement: 0.5}\nreport: {latency: null}\n")
    out = tmp_path / "out"
    rec = apply(load_recipe(recipe), str(ckpt), out, log=lambda _: None)
    old = runtimes.RUNTIMES["1.16"].release
    for key, a in rec["artifacts"].items():
        if key.startswith("onnx"):
            assert {r["onnxruntime"] for r in a["runtimes"]} == {runtimes.installed(), old}, key
    assert rec["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    ledger = json.loads((out / "report.json").read_text())["passes"][0]
    tokens = ledger["details"]["tokens"]
    assert len(tokens) == 3 and tokens[-1] < 65 and ledger["flops"][1] < 0.62 * ledger["flops"][0]
    assert f"tokens after each block: {tokens}" in (out / "report.md").read_text()
    student = load_compressed(out)
    assert [b.r for b in student.blocks] == ledger["details"]["r"]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    y = runtimes.run(runtimes.find("1.16"), out / "model.onnx", "model.onnx", x.numpy(), threads=1)
    with torch.no_grad():
        ref = student(x).numpy()
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("arch, kw, words", [
    ("beit_base_patch16_224", {}, "block 0 adds a relative position bias of fixed size N x N"),
    ("beit_base_patch16_224", {"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}, "position bias shared by all blocks"),
    ("eva02_tiny_patch14_224", {}, "block 0 rotates q and k by position (RoPE)"),
])
def test_families_that_cannot_merge_are_refused_in_one_line(arch, kw, words):
    m = timm.create_model(arch, pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3,
                          num_classes=5, **kw).eval()
    with pytest.raises(InputError, match=re.escape(words)) as e:
        _apply(m, TokenMergeConfig(r=4))
    assert "\n" not in str(e.value)


def test_analyze_reports_how_alike_each_blocks_keys_are():
    """`tok match`: 1 where every token has the same key (block 1's k projection ignores its input), below 1 on
    random keys."""
    from compress.measure.analysis import analyze

    model, _ = vit65(depth=2)
    blocks = detect(model).vit_blocks(model)
    with torch.no_grad():
        blocks[1].attn.score.k.weight.zero_()
    rows = analyze(model, detect(model), torch.randn(4, 3, 32, 32))["blocks"]
    assert rows[0]["token_match"] < 0.95 and rows[1]["token_match"] == pytest.approx(1.0, abs=1e-6)
