"""width: the fold is exact when nothing is removed, widths are multiples, budgets hold or are refused in one
line, the refit is worth it, results are plain narrower models that replay and export."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from compress.adapters import detect
from compress.core.errors import InputError
from compress.load.model import load_compressed
from compress.measure.metrics import count_flops
from compress.passes.width import WidthConfig, width
from compress.run.pipeline import apply
from compress.core.probe import kl
from compress.recipe import parse_recipe
from compress.core.registry import PassContext
from tests.conftest import random_bn_stats, save_timm_dir, tiny_vit, tiny_vit_args

VIT = {"heads": 2, "depth": 2}  # embed 16, head dim 8: with multiple 4, every kind can narrow


def _vit():
    m = tiny_vit(**VIT)
    detect(m).vit_blocks(m)  # convert the blocks (exactly) so teacher and student share names
    return m


def _resnet(block=Bottleneck, seed=0):
    torch.manual_seed(seed)
    # stages 2-4 at half the standard widths (a quarter of their FLOPs); layer1 as standard, so a BasicBlock's first
    # stage still has no downsample and a Bottleneck's does: every coupling the tests name is kept
    m = ResNet(block=block, layers=[1, 1, 1, 1], num_classes=10, channels=(64, 64, 128, 256)).eval()
    with torch.no_grad():  # trained-looking BatchNorm affine and statistics, so the folds are exercised
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.normal_(1, 0.2)
                mod.bias.normal_(0, 0.2)
    return random_bn_stats(m)


def _x(family, n=12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, *((16, 16) if family == "vit" else (32, 32)), generator=g)


def _run(model, family, **cfg):
    student = copy.deepcopy(model)
    res = width(student, detect(student), WidthConfig(**cfg), PassContext(_x(family)))
    return res


@pytest.mark.parametrize("family,block", [("vit", None), ("resnet", Bottleneck), ("resnet", BasicBlock)])
def test_keeping_every_unit_is_exact(family, block):
    """keep: 1.0 still folds every head's rotation into q, k, v and proj: the outputs must not move."""
    teacher = _vit() if family == "vit" else _resnet(block)
    res = _run(teacher, family, keep=1.0, multiple=4)
    x = _x(family, 5)
    with torch.no_grad():
        ref, out = teacher(x), res.model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    kinds = {g["kind"] for g in res.details["groups"].values()}
    assert kinds == ({"qk", "vo", "mlp"} if family == "vit" else {"conv"})


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("allocate", ["uniform", "greedy"])
def test_budget_met_with_widths_on_the_multiple(family, allocate):
    teacher = _vit() if family == "vit" else _resnet()
    mult = 4 if family == "vit" else 8
    res = _run(teacher, family, target=0.5, multiple=mult, allocate=allocate)
    groups = res.details["groups"]
    assert all(g["width"][1] % mult == 0 for g in groups.values())
    assert any(g["width"][1] < g["width"][0] for g in groups.values())
    size = (3, 16, 16) if family == "vit" else (3, 32, 32)
    assert count_flops(res.model, size) < count_flops(teacher, size)
    assert res.details["allocate"] == allocate and res.details["kept"] <= 0.5 + 1e-9
    # the modules are plain and narrower: nothing masked, shapes follow the recorded widths
    for name, g in groups.items():
        mod = res.model.get_submodule(name)
        if g["kind"] == "mlp":
            assert type(mod.fc1) is torch.nn.Linear and mod.fc1.out_features == g["width"][1] == mod.fc2.in_features
        elif g["kind"] == "qk":
            assert mod.q.out_features == mod.k.out_features == g["width"][1] * g["heads"]
        elif g["kind"] == "vo":
            assert mod.v.out_features == mod.proj.in_features == g["width"][1] * g["heads"]
        else:
            assert mod.out_channels == g["width"][1]


def test_auto_keeps_the_lower_kl_and_refit_is_worth_it():
    teacher = _vit()
    x = _x("vit")
    with torch.no_grad():
        ref = teacher(x)
    auto = _run(teacher, "vit", target=0.5, multiple=4, allocate="auto")
    assert set(auto.details["kl"]) == {"uniform", "greedy"}
    assert auto.details["kl"][auto.details["allocate"]] == min(auto.details["kl"].values())
    plain = _run(teacher, "vit", target=0.5, multiple=4, allocate="uniform", refit=False)
    fitted = _run(teacher, "vit", target=0.5, multiple=4, allocate="uniform")
    with torch.no_grad():
        assert kl(ref, fitted.model(x)) < 0.5 * kl(ref, plain.model(x))


@pytest.mark.parametrize("block,allocate", [(Bottleneck, "uniform"), (BasicBlock, "uniform"), (Bottleneck, "greedy")])
def test_residual_width_is_cut_whole_stages_at_a_time(block, allocate):
    """Every conv/BN that writes a stage's residual channels and every conv (and the classifier) that reads them
    narrows together; the cost model's FLOPs are the counted ones; the refit beats the same selection sliced."""
    teacher = _resnet(block)
    x = _x("resnet")
    res = _run(teacher, "resnet", target=0.5, scope="model", layers=["conv", "residual"], allocate=allocate)
    m, groups = res.model, res.details["groups"]
    stages = {n: g["width"] for n, g in groups.items() if g["kind"] == "residual"}
    # a BasicBlock ResNet's layer1 has no downsample: its stream is the stem's, which the pass leaves alone
    assert set(stages) == ({"layer1"} if block is Bottleneck else set()) | {"layer2", "layer3", "layer4"}
    last = "conv3" if block is Bottleneck else "conv2"
    assert any(k < full for full, k in stages.values())
    for name, (full, k) in stages.items():
        assert k % 8 == 0 and k <= full
        first = m.get_submodule(name)[0]
        assert first.downsample[0].out_channels == first.downsample[1].num_features == k
        assert getattr(first, last).out_channels == getattr(first, "bn" + last[-1]).num_features == k
    assert m.layer3[0].conv1.in_channels == m.layer3[0].downsample[0].in_channels == stages["layer2"][1]
    assert m.fc.in_features == m.num_features == stages["layer4"][1]
    measured = count_flops(m, (3, 32, 32)) / count_flops(teacher, (3, 32, 32))
    assert 0.4 < measured <= 0.5 + 1e-6, measured  # the links cost what the layers cost
    plain = _run(teacher, "resnet", target=0.5, scope="model", layers=["conv", "residual"], allocate=allocate,
                 refit=False)
    assert {n: g["width"] for n, g in plain.details["groups"].items()} == {n: g["width"] for n, g in groups.items()}
    with torch.no_grad():
        ref = teacher(x)
        assert kl(ref, m(x)) < 0.5 * kl(ref, plain.model(x))


def test_residual_width_is_not_offered_where_a_stage_is_not_plain():
    """Squeeze-excitation scales the stream's channels inside the block: no stage is cut, in one line."""
    torch.manual_seed(0)
    se = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], num_classes=10, block_args={"attn_layer": "se"}).eval()
    with pytest.raises(InputError, match="no widths of kinds"):
        _run(se, "resnet", keep=0.5, layers=["residual"])


def test_anti_aliased_blocks_narrow_around_their_blur_filter():
    """timm's resnetblur: a BlurPool2d (one fixed filter per channel, sized for the full width) sits between conv1
    and conv2; it was exit 1 (a grouped conv on fewer channels). Keep-all stays exact, half the FLOPs runs."""
    from timm.layers import BlurPool2d

    torch.manual_seed(0)
    blur = random_bn_stats(ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=10, aa_layer=BlurPool2d).eval())
    assert any(isinstance(m, BlurPool2d) for m in blur.modules())
    x = _x("resnet", 5)
    res = _run(blur, "resnet", keep=1.0, multiple=4)
    with torch.no_grad():
        ref, out = blur(x), res.model(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    half = _run(blur, "resnet", target=0.5, scope="model")
    assert count_flops(half.model, (3, 32, 32)) / count_flops(blur, (3, 32, 32)) == pytest.approx(0.5, abs=0.02)
    with torch.no_grad():
        assert half.model(x).shape == (5, 10)


def test_group_norm_blocks_narrow_by_the_traced_graph_in_whole_groups():
    """GroupNorm's statistics span channels (timm resnet50_gn): the family code refuses, the traced channel graph
    (_width_graph.py) narrows whole groups and meets the budget."""
    torch.manual_seed(0)
    gn = ResNet(block=Bottleneck, layers=[1, 1, 1, 1], num_classes=10,
                norm_layer=lambda c, **kw: torch.nn.GroupNorm(4, c)).eval()
    res = _run(gn, "resnet", target=0.5, scope="model")
    assert "traced channel graph" in res.changes[0]
    assert count_flops(res.model, (3, 32, 32)) / count_flops(gn, (3, 32, 32)) == pytest.approx(0.5, abs=0.02)
    before = {n: m.num_channels // m.num_groups for n, m in gn.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    after = {n: (m.num_channels // m.num_groups, m.num_channels % m.num_groups)
             for n, m in res.model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert after == {n: (c, 0) for n, c in before.items()}


def test_unreachable_target_is_refused_in_one_line():
    with pytest.raises(InputError, match="target 0.05 is out of reach") as e:
        _run(_vit(), "vit", target=0.05, multiple=4)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="no widths of kinds"):
        _run(_resnet(), "resnet", target=0.5, layers=["mlp"])
    with pytest.raises(ValueError, match="exactly one of target"):
        WidthConfig(target=0.5, keep=0.5)


@pytest.mark.parametrize("family", ["vit", "resnet", "resnet-residual"])
def test_apply_exports_and_load_compressed_replays_the_widths(tmp_path, family):
    if family == "vit":
        ckpt = save_timm_dir(tiny_vit(**VIT), "vit_tiny_patch16_224", tiny_vit_args(**VIT), tmp_path / "vit")
        model, size, passes = None, (3, 16, 16), [{"width": {"target": 0.5, "multiple": 4}}]
    else:
        ckpt = tmp_path / "r26.safetensors"
        torch.manual_seed(0)
        from timm import create_model
        save_file(create_model("resnet26", num_classes=10).state_dict(), str(ckpt))
        model, size = {"arch": "timm:resnet26", "num_classes": 10, "img_size": 32}, (3, 32, 32)
        passes = [{"width": {"target": 0.5, **({"layers": ["conv", "residual"]} if "residual" in family else {})}}]
    rec = parse_recipe({"version": 1, **({"model": model} if model else {}), "passes": passes,
                        "calibration": {"data": "random"}, "report": {"latency": None}})
    out = tmp_path / "out"
    record = apply(rec, str(ckpt), out, log=lambda m: None)
    assert record["summary"]["flops"]["ratio"] < 0.8
    assert record["artifacts"]["onnx"]["parity"]["rel_diff"] < 1e-4
    assert not {"MatMulInteger", "ConvInteger"} & set(record["artifacts"]["onnx"]["operators"])
    reloaded = load_compressed(out)
    x = torch.randn(3, *size)
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(x).numpy(), onnx_out, atol=1e-4, rtol=1e-4)
    groups = record["passes"][0]["details"]["groups"]
    for name, g in groups.items():
        mod = reloaded.get_submodule(name)
        got = {"mlp": lambda: mod.fc1.out_features, "qk": lambda: mod.q.out_features // g["heads"],
               "vo": lambda: mod.v.out_features // g["heads"], "conv": lambda: mod.out_channels,
               "residual": lambda: mod[0].downsample[0].out_channels}[g["kind"]]()
        assert got == g["width"][1]


def test_narrow_vit_exports_static_reshapes(tmp_path):
    """Every reshape in the exported narrow ViT is a constant shape after onnxslim (batch -1): a head split
    written with -1 on the head dim left a Shape/Gather/Unsqueeze/Concat chain per reshape (321 nodes against
    the teacher's 201 on the shared ViT), each an onnxruntime kernel launch that does not shrink with the width."""
    import onnx

    from compress.export.write import write_onnx

    student = _run(_vit(), "vit", target=0.5, layers=["mlp", "qk", "vo"], multiple=4).model
    path = tmp_path / "narrow.onnx"
    write_onnx(student, path, _x("vit", 4), opset=17, dynamic_batch=True, tol=1e-4, slim=True)
    graph = onnx.load(str(path)).graph
    made = {o: n.op_type for n in graph.node for o in n.output}
    shapes = [made.get(n.input[1], "initializer") for n in graph.node if n.op_type == "Reshape"]
    assert shapes and all(s in ("initializer", "Constant") for s in shapes), shapes
