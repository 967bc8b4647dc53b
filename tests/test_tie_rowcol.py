"""tie_rowcol: the rescalings are exact, the shared matrix is stored once (safetensors and ONNX), results reload."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from compress.adapters import detect
from compress.load.model import load_compressed
from compress.measure.metrics import count_flops, count_params
from compress.passes.tie_rowcol import TieRowColConfig, fit_scale, tie_rowcol
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.core.registry import PassContext
from compress.passes.tied import TiedMLP
from tests.conftest import save_timm_dir, tiny_vit, tiny_vit_args


def _tokens(n=200, d=24, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_relu_rescaling_alone_is_exact():
    """W^T diag(s) relu(W x + b1) with s >= 0 equals the folded form (sqrt(s) W)^T relu(sqrt(s) (W x + b1))."""
    torch.manual_seed(0)
    w, b1, b2 = torch.randn(48, 24), torch.randn(48), torch.randn(24)
    s = torch.rand(48) * 2
    s[::5] = 0  # units switched off by the fit must fold too
    explicit = TiedMLP(w.clone(), b1.clone(), b2.clone(), nn.ReLU(), s.clone())
    r = s.sqrt()
    folded = TiedMLP(r[:, None] * w, r * b1, b2.clone(), nn.ReLU())
    x = torch.randn(4, 7, 24)
    torch.testing.assert_close(folded(x), explicit(x), rtol=1e-5, atol=1e-5)
    assert count_params(folded) == count_params(explicit) - 48


def test_relu_vit_pass_folds_a_nonnegative_fitted_scale():
    teacher = tiny_vit(depth=2)
    for blk in teacher.blocks:
        blk.mlp.act = nn.ReLU()
    x = torch.randn(6, 3, 16, 16)
    student = copy.deepcopy(teacher)
    res = tie_rowcol(student, detect(student), TieRowColConfig(), PassContext(x))
    assert res.details["scaled"] == {"0": False, "1": False}  # folded: no scale parameters left
    detect(teacher).vit_blocks(teacher)
    tokens = torch.randn(50, 24)
    for blk_t, blk_s in zip(teacher.blocks, student.blocks):
        m = blk_t.mlp
        inputs = {}
        h = m.register_forward_hook(lambda mod, a, o: inputs.__setitem__("x", a[0].reshape(-1, 24)))
        with torch.no_grad():
            teacher(x)
        h.remove()
        s, b2, _ = fit_scale(inputs["x"], m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, m.act, nonneg=True)
        assert (s >= 0).all() and (s > 0).any()
        explicit = TiedMLP(m.fc1.weight.detach(), m.fc1.bias.detach(), b2.float(), nn.ReLU(), s.float())
        assert blk_s.mlp.scale is None and blk_s.mlp.weight.shape == m.fc1.weight.shape
        torch.testing.assert_close(blk_s.mlp(tokens), explicit(tokens), rtol=1e-4, atol=1e-5)


def test_gelu_fit_recovers_a_scale_that_ties_exactly():
    """When fc2 really is fc1^T diag(s), the least-squares fit finds s and the tied MLP keeps the function."""
    teacher = tiny_vit(depth=2)
    detect(teacher).vit_blocks(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for blk in teacher.blocks:
            blk.mlp.fc2.weight.copy_(blk.mlp.fc1.weight.T * torch.randn(48))
    student = copy.deepcopy(teacher)
    x = torch.randn(8, 3, 16, 16)
    res = tie_rowcol(student, detect(student), TieRowColConfig(), PassContext(x))
    assert all(e < 1e-6 for e in res.details["fit_error"].values())
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=1e-4, atol=1e-4)
    d, m = 24, 48
    assert count_params(teacher) - count_params(student) == 2 * (m * d - m)  # per block: fc2 gone, s added
    assert count_flops(student, (3, 16, 16)) >= count_flops(teacher, (3, 16, 16))  # FLOPs do not fall
    assert "FLOPs do not fall" in res.changes[0]


NARROW = {"channels": [16, 32, 64, 128], "stem_width": 16}  # the real block structure at a quarter of the width


def _resnet(name: str, seed: int = 0) -> nn.Module:
    """A narrow random timm ResNet with random BN statistics (timm zero-inits the last BN, which hides everything)."""
    torch.manual_seed(seed)
    m = timm.create_model(name, num_classes=10, **NARROW).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.1)
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", ["resnet18", "resnet26"])  # BasicBlock (3x3 pair), Bottleneck (1x1 pair)
def test_batchnorm_absorbs_the_rescalings_exactly(name):
    """Make each tieable last conv exactly a rescaled transpose of the first: tying must then keep the function."""
    teacher = _resnet(name)
    blocks = detect(teacher).res_blocks(teacher)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for blk in blocks:
            if blk.downsample is None:
                first, last = blk.conv1, (blk.conv3 if hasattr(blk, "conv3") else blk.conv2)
                r = torch.rand(first.out_channels, generator=g) + 0.5
                c = (torch.rand(last.out_channels, generator=g) + 0.5) * torch.where(torch.rand(last.out_channels, generator=g) < 0.2, -1.0, 1.0)
                w = first.weight * r[:, None, None, None]
                last.weight.copy_(w.transpose(0, 1).flip(2, 3) / c[:, None, None, None] * 0.7)
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 3, 32, 32)
    res = tie_rowcol(student, detect(student), TieRowColConfig(), PassContext(x))
    assert res.details["groups"] == [[i] for i, b in enumerate(blocks) if b.downsample is None]
    assert all(e < 1e-5 for e in res.details["fit_error"].values())
    with torch.no_grad():
        torch.testing.assert_close(student(x), teacher(x), rtol=1e-4, atol=1e-4)
    tied = [b for grp in res.details["groups"] for b in grp]
    per_block = sum(blocks[b].conv1.weight.numel() for b in tied)  # the last conv's weight is gone
    assert count_params(teacher) - count_params(student) == per_block
    assert count_flops(student, (3, 32, 32)) == count_flops(teacher, (3, 32, 32))


def test_staged_shares_one_weight_per_stage():
    teacher = _resnet("resnet50")
    student = copy.deepcopy(teacher)
    res = tie_rowcol(student, detect(student), TieRowColConfig(staged=True), PassContext(torch.randn(2, 3, 32, 32)))
    assert res.details["groups"] == [[0, 1, 2], [4, 5, 6], [8, 9, 10, 11, 12], [14, 15]]  # narrow stem: layer1.0 keeps width
    blocks = detect(student).res_blocks(student)
    ref = blocks[4].conv1.shared_weight()
    assert all(blocks[b].conv1.shared_weight() is ref and blocks[b].conv3.shared_weight() is ref for b in (4, 5, 6))
    keys = [k for k in student.state_dict() if k.startswith("layer2.")]
    assert "layer2.1.conv1.weight" in keys and not any(k.endswith(("conv3.weight",)) and not k.startswith("layer2.0") for k in keys)
    groups = res.details["groups"]
    saved = sum(2 * len(grp) * blocks[grp[0]].conv1.shared_weight().numel() - blocks[grp[0]].conv1.shared_weight().numel()
                for grp in groups)
    assert count_params(teacher) - count_params(student) == saved


def _initializers(path) -> dict[str, tuple]:
    return {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_apply_stores_the_tied_matrix_once_and_reloads(tmp_path, family):
    if family == "vit":
        ckpt = save_timm_dir(tiny_vit(depth=2), "vit_tiny_patch16_224", tiny_vit_args(), tmp_path / "vit")
        model, size, tie = None, (3, 16, 16), {}
    else:
        ckpt = tmp_path / "r18.safetensors"
        save_file(_resnet("resnet18").state_dict(), str(ckpt))
        model = {"arch": "timm:resnet18", "num_classes": 10, "img_size": 32, "kwargs": NARROW}
        size, tie = (3, 32, 32), {"staged": True}
    rec = parse_recipe({"version": 1, **({"model": model} if model else {}), "passes": [{"tie_rowcol": tie}],
                        "calibration": {"data": "random"}, "export": {"slim": True}, "report": {"latency": None}})
    out = tmp_path / "out"
    record = apply(rec, str(ckpt), out, log=lambda m: None)
    s = record["summary"]
    assert s["flops"]["ratio"] == 1.0 and s["params"]["ratio"] < 0.9
    assert s["safetensors_bytes"]["ratio"] < 0.92
    if family == "resnet":  # the tiny ViT's file is mostly graph, not weights; its initializers are checked below
        assert s["onnx_bytes"]["ratio"] < 0.92
    inits = _initializers(out / "model.onnx")
    stats = sum(b.numel() for n, b in load_compressed(out).named_buffers() if "running" in n)  # unfolded BN keeps them
    assert sum(np.prod(d) for d in inits.values()) <= s["params"]["student"] + stats  # no second copy of any weight
    if family == "vit":
        assert [n for n, d in inits.items() if sorted(d) == [24, 48]] == ["blocks.0.mlp.weight", "blocks.1.mlp.weight"]
    reloaded = load_compressed(out)
    x = torch.randn(3, *size)
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(x).numpy(), onnx_out, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resnet50_runs_through_both_passes_and_exports(tmp_path):
    """A random-weight timm resnet50: tie_rowcol (staged) then lowrank, ONNX verified in onnxruntime, reloads."""
    torch.manual_seed(0)
    full = timm.create_model("resnet50", num_classes=10).eval()
    with torch.no_grad():  # full width; random BN statistics as in _resnet (timm zero-inits the last BN)
        for mod in full.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.running_var.uniform_(0.5, 1.5)
    ckpt = tmp_path / "r50.safetensors"
    save_file(full.state_dict(), str(ckpt))
    rec = parse_recipe({"version": 1, "model": {"arch": "timm:resnet50", "num_classes": 10, "img_size": 64},
                        "passes": [{"tie_rowcol": {"staged": True}}, {"lowrank": {"target": 0.5, "layers": ["conv"]}}],
                        "calibration": {"data": "random"}, "export": {"slim": True}, "report": {"latency": None}})
    out = tmp_path / "out"
    record = apply(rec, str(ckpt), out, log=lambda msg: None)
    assert record["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    assert record["passes"][0]["flops"][0] == record["passes"][0]["flops"][1]  # tying: FLOPs unchanged
    # lowrank halves the FLOPs of the convs it may still rewrite: the tied ones are no longer plain convs
    assert record["summary"]["flops"]["ratio"] < 0.7 and record["summary"]["params"]["ratio"] < 0.8
    x = torch.randn(2, 3, 64, 64)
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(load_compressed(out)(x).numpy(), onnx_out, atol=1e-4, rtol=1e-3)


def test_passes_need_only_the_shared_resnet_names_torchvision():
    """torchvision's ResNet uses the same conv1/bn1/.../downsample names: the duck-typed helpers serve it as is."""
    from types import SimpleNamespace

    import torchvision

    from compress.adapters.timm_resnet import resnet_blocks, resnet_layers
    from compress.passes.lowrank import LowRankConfig, lowrank

    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    adapter = SimpleNamespace(family="resnet", res_blocks=resnet_blocks, layers=resnet_layers)
    x = torch.randn(2, 3, 32, 32)
    before = count_params(m)
    res = tie_rowcol(m, adapter, TieRowColConfig(), PassContext(x))
    assert res.details["groups"] == [[0], [1], [3], [5], [7]]
    res = lowrank(m, adapter, LowRankConfig(rank=0.25, layers=["conv"]), PassContext(x))
    assert res.details["layers"] and count_params(m) < before
    assert m(x).shape == (2, 10)
