"""qk_merge (exact) and vo (fold) keep the function on random timm ViTs; the growth guard fires."""
from __future__ import annotations

import copy

import pytest
import torch

from compress.adapters import detect
from compress.core.errors import InputError
from compress.measure.metrics import count_params, fidelity, logits64
from compress.passes.qk_merge import QKMergeConfig, qk_merge
from compress.passes.vo import VOConfig, vo
from compress.core.registry import PassContext
from tests.conftest import tiny_vit

HEADS = [1, 2, 3, 4]


def _apply(model, *steps):
    adapter = detect(model)
    ctx = PassContext(torch.zeros(1))
    for fn, cfg in steps:
        model = fn(model, adapter, cfg, ctx).model
    return model.eval()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("heads", HEADS)
def test_qk_merge_and_vo_fold_are_exact(heads, qkv_bias):
    teacher = tiny_vit(seed=heads, heads=heads, qkv_bias=qkv_bias, depth=3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = [(qk_merge, QKMergeConfig(allow_growth=True)), (vo, VOConfig(allow_growth=True))]
    for n in (1, 2):  # each pass alone, then both
        student = _apply(copy.deepcopy(teacher), *steps[:n]) if n == 2 else _apply(copy.deepcopy(teacher), steps[0])
        with torch.no_grad():
            ref, out = teacher(x), student(x)
        assert _rel(ref, out) <= 1e-4, f"float32 heads={heads} bias={qkv_bias}"
        assert _rel(logits64(teacher, x), logits64(student, x)) <= 1e-6  # only the float32 rounding of the new weights
    only_vo = _apply(copy.deepcopy(teacher), steps[1])
    with torch.no_grad():
        assert _rel(teacher(x), only_vo(x)) <= 1e-4


def test_merged_model_really_changed_structure():
    """Guard against a vacuous exactness test: the rewritten model must hold the merged weights."""
    teacher = tiny_vit(heads=1)
    student = _apply(copy.deepcopy(teacher), (qk_merge, QKMergeConfig()), (vo, VOConfig()))
    keys = set(student.state_dict())
    assert any(k.endswith("attn.score.weight") for k in keys) and any(k.endswith("attn.value.weight") for k in keys)
    assert not any("qkv" in k for k in keys)


def test_exactness_check_detects_a_perturbation():
    """The tolerance used for exactness is tight enough to catch a small weight error."""
    teacher = tiny_vit(heads=2)
    student = _apply(copy.deepcopy(teacher), (vo, VOConfig(allow_growth=True)))
    with torch.no_grad():
        student.blocks[0].attn.value.weight.mul_(1.01)
    x = torch.randn(4, 3, 16, 16)
    assert fidelity(logits64(teacher, x), logits64(student, x))["rel_diff"] > 1e-4


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_one_head_merge_shrinks_by_the_formula(qkv_bias):
    teacher = tiny_vit(heads=1, qkv_bias=qkv_bias)
    d, depth = 8, 2
    p0 = count_params(teacher)
    merged = _apply(copy.deepcopy(teacher), (qk_merge, QKMergeConfig()))
    # per block: Wq, Wk (2 d^2) and their biases (2 d) become one d x d form (+ a d-vector when bq exists)
    assert count_params(merged) - p0 == depth * ((d * d + (d if qkv_bias else 0)) - (2 * d * d + (2 * d if qkv_bias else 0)))
    folded = _apply(copy.deepcopy(teacher), (vo, VOConfig()))
    # per block: Wv, Wo (2 d^2) + biases (bv if qkv_bias, bo always) become d x d + one bias
    assert count_params(folded) - p0 == depth * ((d * d + d) - (2 * d * d + (d if qkv_bias else 0) + d))


@pytest.mark.parametrize("fn,cfg", [(qk_merge, QKMergeConfig), (vo, VOConfig)])
@pytest.mark.parametrize("heads", [2, 3, 4])
def test_growth_guard_refuses_multi_head(fn, cfg, heads):
    teacher = tiny_vit(heads=heads)
    with pytest.raises(InputError, match=r"would grow the model: params [+-][\d,]+ .*allow_growth"):
        _apply(copy.deepcopy(teacher), (fn, cfg()))
    grown = _apply(copy.deepcopy(teacher), (fn, cfg(allow_growth=True)))
    if heads > 2:  # with 2 heads params tie and only FLOPs grow
        assert count_params(grown) > count_params(teacher)


@pytest.mark.parametrize("fn,cfg", [(qk_merge, QKMergeConfig), (vo, VOConfig)])
def test_growth_guard_allows_one_head(fn, cfg):
    teacher = tiny_vit(heads=1)
    assert count_params(_apply(copy.deepcopy(teacher), (fn, cfg()))) < count_params(teacher)


def test_passes_touch_only_selected_blocks():
    teacher = tiny_vit(heads=1, depth=3)
    student = _apply(copy.deepcopy(teacher), (qk_merge, QKMergeConfig(blocks=[1])))
    kinds = [type(b.attn.score).__name__ for b in student.blocks]
    assert kinds == ["SeparateQK", "MergedQK", "SeparateQK"]
