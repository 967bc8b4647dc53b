"""The floor under every family: a model no adapter knows still loads, exports, verifies and reloads; lowrank finds
its layers by structure; a pass that cannot apply says so in one line (exit 2), never a crash."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from timm.layers import StdConv2d, StdConv2dSame
from torch import nn

from compress.adapters import GENERIC, detect
from compress.adapters.generic import structural_layers
from compress.core.errors import InputError
from compress.export.write import _graph, to_onnx
from compress.load.frozen import freeze_weight_norm_convs
from compress.load.model import load, load_compressed
from compress.core.modules import ViTBlock
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from tests.conftest import random_bn_stats, run_cli, save_timm_dir, write_recipe

SMALL = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "num_classes": 5}


def _seeded(arch: str, args: dict) -> nn.Module:
    """Random weights with fan-in scale and random biases (timm's init gives near-constant logits)."""
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, **args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
            elif "norm" not in name and name != "head.bias":
                p.normal_(0, 0.2)
    return random_bn_stats(m).eval()


@pytest.fixture
def relpos_dir(tmp_path):
    return save_timm_dir(_seeded("vit_relpos_small_patch16_224", SMALL), "vit_relpos_small_patch16_224", SMALL,
                         tmp_path / "relpos")


def test_unknown_family_loads_on_the_generic_adapter(relpos_dir):
    loaded = load(str(relpos_dir))
    assert loaded.adapter is GENERIC and loaded.source["family"] == "other"
    assert tuple(loaded.data_cfg["input_size"]) == (3, 32, 32)  # the patch embedding's size, found without a family
    blocks = loaded.adapter.vit_blocks(loaded.model)  # no family, but its blocks map by structure
    assert len(blocks) == 2 and all(isinstance(b, ViTBlock) for b in blocks)
    assert loaded.adapter.describe(loaded.model)["tokens"] == 16  # 4 x 4 patches, no class token


@pytest.mark.parametrize("arch", ["vit_relpos_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
                                  "vit_small_patch16_18x2_224"])
def test_structural_layers_are_the_called_plain_layers_by_kind(arch):
    args = {**SMALL, **({"img_size": 28, "patch_size": 14} if "patch14" in arch else {})}
    model = _seeded(arch, args)
    x = torch.randn(1, 3, args["img_size"], args["img_size"])
    found = dict(structural_layers(model, x))
    assert found["patch_embed.proj"] == "stem" and found["head"] == "head"
    assert any(k == "attn" for k in found.values()) and any(k == "mlp" for k in found.values())
    for name, kind in found.items():
        m = model.get_submodule(name)
        assert type(m) in (nn.Linear, nn.Conv2d)
        if kind == "mlp":
            assert "mlp" in name  # every family here names its MLP so; the classifier did not read it
    if arch.startswith("beit"):  # Beit reads qkv.weight under F.linear: replacing it would break the forward
        assert not any(n.endswith("attn.qkv") for n in found)


def test_export_lowrank_and_reload_on_a_generic_model(tmp_path, relpos_dir):
    out = tmp_path / "out"
    rec = parse_recipe({"version": 1, "passes": [{"lowrank": {"target": 0.5, "scope": "model", "multiple": 4}}],
                        "calibration": {"data": "random"}, "report": {"latency": None}})
    record = apply(rec, str(relpos_dir), out, log=lambda m: None)
    assert 0.4 < record["summary"]["flops"]["ratio"] <= 0.52
    rep = json.loads((out / "report.json").read_text())
    kinds = {v["kind"] for v in rep["passes"][0]["details"]["layers"].values()}
    assert kinds <= {"attn", "mlp"} and "mlp" in kinds
    model = load_compressed(out)
    x = torch.randn(2, 3, 32, 32)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), got, atol=1e-4)


@pytest.fixture
def parallel_dir(tmp_path):
    return save_timm_dir(_seeded("vit_small_patch16_18x2_224", SMALL), "vit_small_patch16_18x2_224", SMALL,
                         tmp_path / "parallel")


def test_block_pass_on_a_generic_model_is_one_line_or_skipped(tmp_path, parallel_dir):
    recipe = write_recipe(tmp_path / "r.yaml", "version: 1\npasses:\n  - qk_merge: {mode: exact}\n"
                                               "report: {latency: null}\n")
    res = run_cli("apply", recipe, parallel_dir, "-o", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: pass 'qk_merge' does not apply to this VisionTransformer") and "ParallelThingsBlock" in line
    assert "module types" in line and "lowrank works" in line
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    rec = parse_recipe({"version": 1, "skip_inapplicable": True, "passes": [{"vo": {"mode": "fold"}}],
                        "report": {"latency": None}})
    record = apply(rec, str(parallel_dir), tmp_path / "out2", log=lambda m: None)
    assert record["passes"][0]["skipped"].startswith("pass 'vo' does not apply")
    load_compressed(tmp_path / "out2")  # the skipped pass is skipped again when the structure replays


def test_parallel_blocks_fall_to_the_generic_adapter():
    model = _seeded("vit_small_patch16_18x2_224", SMALL)
    assert detect(model) is GENERIC  # a VisionTransformer, but its blocks are not the standard Block
    with pytest.raises(InputError, match="ParallelThingsBlock"):
        GENERIC.vit_blocks(model)


def test_weight_standardised_convs_freeze_exactly_and_export_without_training_nodes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(StdConv2d(3, 8, 3, padding=1), nn.ReLU(), StdConv2dSame(8, 8, 3, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        want = model(x)
    assert freeze_weight_norm_convs(model) == ["0", "2"]
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    to_onnx(model, tmp_path / "m.onnx", (3, 15, 15), opset=17, dynamic_batch=True)
    _graph(tmp_path / "m.onnx")  # raises on a training-mode BatchNormalization


def test_extra_forward_arguments_do_not_reach_the_exporter(tmp_path):
    """timm Eva's forward(x, attn_mask=None, is_causal=False): the exporter would pass the defaults as tensors."""
    model = _seeded("eva02_tiny_patch14_224", {**SMALL, "img_size": 28, "patch_size": 14})
    to_onnx(model, tmp_path / "eva.onnx", (3, 28, 28), opset=17, dynamic_batch=True)
    x = torch.randn(2, 3, 28, 28)
    got = ort.InferenceSession(str(tmp_path / "eva.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), got, atol=1e-4)
    assert "forward" not in vars(model)


def test_width_on_grouped_convs_goes_through_the_traced_graph():
    """ResNeXt's grouped convs were refused ("lowrank is the pass") by the family code; the traced channel graph
    (passes/_width_graph.py) now narrows them to the FLOP target, dropping whole groups: each kept group reads and
    writes as many channels as before."""
    torch.manual_seed(0)
    model = timm.create_model("resnext50_32x4d", pretrained=False, num_classes=5, layers=[1, 1, 1, 1]).eval()
    from compress.measure.metrics import count_flops
    from compress.passes.width import WidthConfig, width
    from compress.core.registry import PassContext

    x = torch.randn(2, 3, 32, 32)
    before = [(m.in_channels // m.groups, m.out_channels // m.groups) for m in model.modules()
              if isinstance(m, nn.Conv2d) and m.groups > 1]
    res = width(model, detect(model), WidthConfig(target=0.5, scope="model"), PassContext(x))
    assert abs(count_flops(res.model, (3, 32, 32)) / count_flops(model, (3, 32, 32)) - 0.5) <= 0.02
    after = [(m.in_channels // m.groups, m.out_channels // m.groups, m.groups) for m in res.model.modules()
             if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [a[:2] for a in after] == before and all(a[2] < 32 for a in after)
    assert res.model(x).shape == (2, 5)
