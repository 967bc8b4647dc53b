"""qk_merge symmetric, vo remove, attn_diffusion, crate mssa: exact where they should be, counts the formulas give."""
from __future__ import annotations

import copy
import json

import onnxruntime as ort
import pytest
import torch

from compress.adapters import detect
from compress.core.errors import InputError
from compress.load.model import load_compressed
from compress.measure.metrics import count_params, logits64
from compress.core.modules import MergedQK
from compress.passes.attn_diffusion import AttnDiffusionConfig, attn_diffusion
from compress.passes.crate import CrateConfig, crate
from compress.passes.qk_merge import QKMergeConfig, _merged64, qk_merge
from compress.passes.vo import VOConfig, fit_removed, vo
from compress.run.pipeline import apply
from compress.recipe import load_recipe
from compress.core.registry import PassContext
from tests.conftest import save_timm_dir, tiny_vit, tiny_vit_args, write_recipe

X = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _apply(model, fn, cfg, calib=X):
    return fn(model, detect(model), cfg, PassContext(calib)).model.eval()


def _attn_params(d: int, a: int, bias: bool) -> int:
    """q, k, v and proj of one standard attention: 4 weights, 3 qkv biases + the proj bias."""
    return 4 * d * a + (3 * a if bias else 0) + d


def test_attn_diffusion_is_exact_at_zero_and_applies_a_minus_gamma_i():
    teacher = tiny_vit(heads=3, depth=2)
    student = _apply(copy.deepcopy(teacher), attn_diffusion, AttnDiffusionConfig())
    torch.testing.assert_close(logits64(student, X), logits64(teacher, X), rtol=0, atol=1e-12)
    assert count_params(student) == count_params(teacher) + 2  # one gamma per block
    value = student.blocks[0].attn.value
    attn = torch.rand(2, 3, 5, 5).softmax(-1)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        value.gamma.fill_(0.3)
        torch.testing.assert_close(value(attn, x), value.inner(attn - 0.3 * torch.eye(5), x))
        assert not torch.allclose(student(X), teacher(X))  # gamma really reaches the output


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_symmetric_full_rank_equals_the_symmetric_part_model(qkv_bias):
    teacher = tiny_vit(heads=3, depth=2, qkv_bias=qkv_bias)
    d = teacher.embed_dim
    ref = copy.deepcopy(teacher)
    for blk in detect(ref).vit_blocks(ref):  # the reference: merged forms replaced by their symmetric parts
        w, b = _merged64(blk.attn.score)
        blk.attn.score = MergedQK(((w + w.transpose(1, 2)) / 2).float(), None if b is None else b.float())
    student = _apply(copy.deepcopy(teacher), qk_merge, QKMergeConfig(mode="symmetric", rank=d, allow_growth=True))  # full rank grows it
    torch.testing.assert_close(logits64(student, X), logits64(ref, X), rtol=0, atol=1e-5 * logits64(ref, X).abs().max().item())
    assert not torch.allclose(logits64(ref, X), logits64(teacher, X), atol=1e-3)  # the antisymmetric part mattered


def test_symmetric_rank_r_has_the_predicted_parameters():
    teacher = tiny_vit(heads=3, depth=2)
    d, h, r = teacher.embed_dim, 3, 4
    student = _apply(copy.deepcopy(teacher), qk_merge, QKMergeConfig(mode="symmetric", rank=r))
    per_block_before = 2 * (d * d + d)  # q and k with biases
    per_block_after = h * d * r + h * d  # one d x r projection per head + the key-side bias term
    assert count_params(student) == count_params(teacher) - 2 * (per_block_before - per_block_after)
    with pytest.raises(InputError, match="rank 99 exceeds"):
        _apply(copy.deepcopy(teacher), qk_merge, QKMergeConfig(mode="symmetric", rank=99))


def test_vo_remove_fit_recovers_alpha_and_predicted_parameters():
    g = torch.Generator().manual_seed(0)
    attn, x = torch.rand(4, 3, 7, 7, generator=g).softmax(-1), torch.randn(4, 7, 6, generator=g)
    alpha, bias = torch.tensor([0.5, -1.0, 2.0]), torch.randn(6, generator=g)
    target = torch.einsum("h,bhnm,bmd->bnd", alpha, attn, x) + bias
    a, b = fit_removed(attn, x, target)
    torch.testing.assert_close(a.float(), alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(b.float(), bias, atol=1e-4, rtol=0)

    teacher = tiny_vit(heads=3, depth=2)
    d = teacher.embed_dim
    student = _apply(copy.deepcopy(teacher), vo, VOConfig(mode="remove"))
    per_block_before = 2 * d * d + 2 * d  # v and proj with biases
    assert count_params(student) == count_params(teacher) - 2 * (per_block_before - (3 + d))
    with pytest.raises(InputError, match="calibration"):
        vo(copy.deepcopy(teacher), detect(teacher), VOConfig(mode="remove"), PassContext(None))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_mssa_has_the_predicted_parameters(qkv_bias):
    teacher = tiny_vit(heads=3, depth=2, qkv_bias=qkv_bias)
    d = teacher.embed_dim
    student = _apply(copy.deepcopy(teacher), crate, CrateConfig())
    after = d * d + d * d + d  # basis (H x dh x d) + untied proj with bias
    assert count_params(student) == count_params(teacher) - 2 * (_attn_params(d, d, qkv_bias) - after)


def test_mssa_reproduces_a_model_whose_q_k_v_are_already_tied():
    """With Wq_h = Wk_h = Wv_h = c U_h^T (orthonormal U_h) and no q/k bias, MSSA is the same function."""
    teacher = tiny_vit(heads=3, depth=2, qkv_bias=True)
    d, dh = teacher.embed_dim, 8
    with torch.no_grad():
        for i, blk in enumerate(teacher.blocks):
            w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            for h in range(3):
                u = torch.linalg.qr(torch.randn(d, dh, generator=torch.Generator().manual_seed(10 * i + h)))[0]
                for part in range(3):
                    w[part * d + h * dh: part * d + (h + 1) * dh] = 2.0 * u.T
            b[: 2 * d] = 0  # q and k biases (MSSA has none); the v bias folds exactly
    student = _apply(copy.deepcopy(teacher), crate, CrateConfig())
    ref = logits64(teacher, X)
    torch.testing.assert_close(logits64(student, X), ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_every_new_pass_exports_and_load_compressed_round_trips(tmp_path, image_zip):
    """One recipe with all of them; the pipeline checks ONNX parity in onnxruntime before writing."""
    recipe = write_recipe(tmp_path / "r.yaml", f"""version: 1
passes:
  - mlp_strip: {{blocks: auto, fraction: 0.5}}
  - attn_diffusion: {{blocks: [0], gamma: 0.2}}
  - qk_merge: {{mode: symmetric, rank: 5, blocks: [0]}}
  - vo: {{mode: remove, blocks: [1]}}
  - crate: {{mode: mssa}}
calibration: {{data: {image_zip}, images: 16}}
report: {{latency: null}}
""")
    vit_dir = save_timm_dir(tiny_vit(depth=4), "vit_tiny_patch16_224", tiny_vit_args(depth=4), tmp_path / "vit")
    out = tmp_path / "out"
    record = apply(load_recipe(recipe), str(vit_dir), out, log=lambda m: None)
    ledger = {e["pass"]: e for e in record["passes"]}
    assert ledger["crate"]["details"]["blocks"] == [2, 3]  # blocks 0 and 1 keep their rewritten parts
    auto = ledger["mlp_strip"]["details"]
    assert len(auto["blocks"]) == 2 and auto["scores"][0]["block"] == auto["blocks"][0]
    rep = json.loads((out / "report.json").read_text())
    assert rep["learned"] == {"blocks.0.attn.value": {"gamma": pytest.approx(0.2)}}
    assert "Learned pass parameters" in (out / "report.md").read_text()
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    model = load_compressed(out)
    x = torch.randn(3, 3, 16, 16)

    stripped = [i for i, b in enumerate(model.blocks) if b.mlp is None]
    assert stripped == auto["blocks"]
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():  # the rebuilt model computes what the exported student computes
        torch.testing.assert_close(model(x), torch.from_numpy(onnx_out), rtol=1e-4, atol=1e-4)
    assert type(model.blocks[2].attn).__name__ == "MSSA" and type(model.blocks[0].attn.value.inner).__name__ == "SeparateVO"


def test_symmetric_growth_guard_names_the_rank_that_pays():
    teacher = tiny_vit(heads=3, depth=2)
    d = teacher.embed_dim
    below = (2 * (d * d + d)) // (3 * d)  # the rank under which 3 * d * r undercuts q and k with biases
    with pytest.raises(InputError, match=rf"with 3 heads \(it pays for rank below about {below}\).*allow_growth"):
        _apply(copy.deepcopy(teacher), qk_merge, QKMergeConfig(mode="symmetric", rank=d))
