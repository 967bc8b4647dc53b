"""width on models no family knows: MLP pairs found by structure (plain, gated SwiGLU, fused GluMlp), exact when
every unit is kept, a norm over the hidden units refused by the independence check, replayed by load_compressed."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from timm.layers import SwiGLU

from compress.adapters import GENERIC
from compress.load.model import load_compressed
from compress.measure.metrics import count_flops
from compress.passes._width_mlp import find_pairs, mlp_width
from compress.passes.width import WidthConfig
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.core.registry import PassContext
from tests.test_floor import SMALL, _seeded

P14 = {**SMALL, "img_size": 28, "patch_size": 14}


def _swiglu_vit():
    torch.manual_seed(0)
    return _seeded("vit_tiny_patch16_224", {**SMALL, "mlp_layer": SwiGLU})


CASES = {"relpos": lambda: _seeded("vit_relpos_small_patch16_224", SMALL),
         "beit": lambda: _seeded("beit_base_patch16_224", SMALL),
         "eva_glu": lambda: _seeded("eva02_tiny_patch14_224", P14),
         "parallel": lambda: _seeded("vit_small_patch16_18x2_224", SMALL),
         "swiglu": _swiglu_vit}


@pytest.mark.parametrize("case", sorted(CASES))
def test_keeping_every_unit_is_exact_and_half_meets_the_model_budget(case):
    model = CASES[case]()
    s = 28 if case == "eva_glu" else 32
    x = torch.randn(8, 3, s, s)
    pairs, _ = find_pairs(model, x)
    assert len(pairs) >= 2  # every block's MLP (two per parallel block)
    with torch.no_grad():
        want = model(x)
    same = mlp_width(copy.deepcopy(model), GENERIC, WidthConfig(keep=1.0), PassContext(x)).model
    with torch.no_grad():
        torch.testing.assert_close(same(x), want, atol=1e-5, rtol=0)
    half = mlp_width(copy.deepcopy(model), GENERIC, WidthConfig(target=0.5, scope="model", multiple=2),
                     PassContext(x)).model
    assert abs(count_flops(half, (3, s, s)) / count_flops(model, (3, s, s)) - 0.5) <= 0.02


def test_a_norm_over_the_hidden_units_is_not_a_pair():
    """timm SwiGLU with its scale norm: dropping units changes the others' normalisation, so it is left alone."""
    model = _seeded("vit_tiny_patch16_224", {**SMALL, "mlp_layer": SwiGLU, "scale_mlp_norm": True})
    assert find_pairs(model, torch.randn(2, 3, 32, 32))[0] == []


def test_generic_width_is_replayed_by_load_compressed(tmp_path):
    from tests.conftest import save_timm_dir

    folder = save_timm_dir(_seeded("eva02_tiny_patch14_224", P14), "eva02_tiny_patch14_224", P14, tmp_path / "eva")
    out = tmp_path / "out"
    rec = parse_recipe({"version": 1, "passes": [{"width": {"target": 0.5, "scope": "model", "multiple": 2}}],
                        "calibration": {"data": "random"}, "report": {"latency": None}})
    record = apply(rec, str(folder), out, log=lambda m: None)
    assert abs(record["summary"]["flops"]["ratio"] - 0.5) <= 0.02
    model = load_compressed(out)
    x = torch.randn(2, 3, 28, 28)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), got, atol=1e-4)
