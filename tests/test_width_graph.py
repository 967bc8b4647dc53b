"""width by a traced channel graph (Torch-Pruning's DependencyGraph, compress/passes/_width_graph.py): every coupling
(residual add, concat, chunk split, fixed split, grouped, depthwise, GroupNorm, SE gate) narrows into a model that runs
with its couplings kept; keeping everything is exact; the FLOP share is met; the refit is worth it; apply exports with
parity and load_compressed replays; a model whose channels pass through an opaque op is refused in one line."""
from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import graph_models as gm
from compress.adapters import detect
from compress.core.errors import InputError
from compress.core.registry import PassContext
from compress.load.model import load_compressed
from compress.measure.metrics import count_flops
from compress.passes.width import WidthConfig, width
from compress.recipe import parse_recipe
from compress.run.pipeline import apply
from conftest import random_bn_stats

SIZE = (3, 32, 32)


def _model(kind):
    torch.manual_seed(0)
    m = gm.coupled(kind) if kind != "untraceable" else gm.Untraceable()
    with torch.no_grad():  # trained-looking norms, so importance and refit see distinct channels
        for mod in m.modules():
            if isinstance(mod, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                mod.weight.normal_(1, 0.3)
                mod.bias.normal_(0, 0.2)
    return random_bn_stats(m).eval()


def _x(n=16):
    return torch.randn(n, *SIZE, generator=torch.Generator().manual_seed(1))


def _width(model, **cfg):
    student = copy.deepcopy(model)
    return width(student, detect(student), WidthConfig(**cfg), PassContext(_x()))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _coupled(kind, m):
    """The widths that must agree after pruning, per coupling."""
    b = m.blocks[0]
    stem = m.stem[0].out_channels
    if kind == "residual":
        return [(stem, b.a[1].out_channels, b.b[1].out_channels, b.a[0][0].in_channels, m.fc.in_features)]
    if kind == "concat":
        return [(b.out[0].in_channels, stem + b.l1[0].out_channels + b.l2[0].out_channels),
                (b.l2[0].in_channels, stem + b.l1[0].out_channels)]
    if kind in ("split", "fixed_split"):
        return [(b.wide[0].out_channels, b.left[0].in_channels + b.right[0].in_channels),
                (b.left[0].in_channels, b.right[0].in_channels)]
    if kind == "grouped":  # whole groups go: each keeps its 8 channels in and out
        g = b.seq[1][0]
        return [(g.in_channels // g.groups, g.out_channels // g.groups, 8), (g.in_channels % g.groups, 0),
                (g.in_channels, g.out_channels, b.seq[0][0].out_channels, b.seq[2][0].in_channels)]
    if kind == "grouped_few":  # 2 groups: both stay, each loses the same positions
        g = b.seq[1][0]
        return [(g.groups, 2), (g.in_channels, b.seq[0][0].out_channels), (g.in_channels % 2, 0), (g.out_channels % 2, 0)]
    if kind == "depthwise":
        d = b.seq[1][0]
        return [(d.groups, d.in_channels, d.out_channels, b.seq[0][0].out_channels, b.seq[2].in_channels),
                (stem, b.seq[2].out_channels)]
    if kind == "groupnorm":  # whole groups: the channels per group stay as built
        n1, n2 = b.seq[0][1], b.seq[1][1]
        return [(n1.num_channels // n1.num_groups, 8), (n2.num_channels // n2.num_groups, 4),
                (n1.num_channels % n1.num_groups, 0)]
    if kind == "se":
        return [(b.conv[0].out_channels, b.fc1.in_channels, b.fc2.out_channels, b.out[0].in_channels)]
    raise KeyError(kind)


@pytest.mark.parametrize("kind", sorted(gm.BLOCKS))
def test_each_coupling_narrows_consistently_and_keep_all_is_exact(kind):
    model = _model(kind)
    x = _x(8)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(_width(model, keep=1.0, multiple=2).model(x), want)
    res = _width(model, target=0.5, scope="model", multiple=2)
    narrow = res.model
    assert count_flops(narrow, SIZE) < 0.6 * count_flops(model, SIZE)
    for widths in _coupled(kind, narrow):
        assert len(set(widths)) == 1, (kind, widths)
    with torch.no_grad():
        assert _rel(narrow(x), want) < 0.1
    if kind == "groupnorm":
        assert narrow.blocks[0].seq[0][1].num_groups < 4  # a group went, whole
    if kind == "grouped":
        assert narrow.blocks[0].seq[1][0].groups < 4 and any("/32" in c for c in res.changes)
    if kind == "fixed_split":  # torch.split(x, 16) in forward: the halves stay 16 wide, the branches narrow
        assert narrow.blocks[0].wide[0].out_channels == 32 and narrow.blocks[0].left[0].out_channels < 16
        assert any("left whole" in c and "split" in c for c in res.changes)


def test_every_coupling_together_meets_the_flop_share_and_the_refit_is_worth_it():
    model = _model("all")
    full = count_flops(model, SIZE)
    fitted = _width(model, target=0.5, scope="model", multiple=2)
    sliced = _width(model, target=0.5, scope="model", multiple=2, refit=False)
    assert abs(count_flops(fitted.model, SIZE) / full - 0.5) <= 0.02
    x = torch.randn(32, *SIZE, generator=torch.Generator().manual_seed(7))  # held out
    with torch.no_grad():
        want = model(x)
        assert _rel(fitted.model(x), want) < 0.7 * _rel(sliced.model(x), want)


def test_apply_exports_with_parity_and_load_compressed_replays(tmp_path):
    model = _model("all")
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    rec = parse_recipe({"version": 1, "model": {"arch": "graph_models:coupled", "img_size": 32},
                        "passes": [{"width": {"target": 0.5, "scope": "model", "multiple": 2}}], "calibration": {"data": "random"},
                        "report": {"latency": None}, "export": {"min_runtime": None, "slim": False}})
    out = tmp_path / "out"
    record = apply(rec, str(ckpt), out, log=lambda *_: None)
    assert abs(record["summary"]["flops"]["ratio"] - 0.5) <= 0.02
    assert record["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    again = load_compressed(out)
    x = torch.randn(2, *SIZE)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(again(x).numpy(), got, atol=1e-4, rtol=1e-4)
    assert count_flops(again, SIZE) < 0.55 * count_flops(model, SIZE)


def test_channels_through_an_opaque_op_are_refused_naming_it():
    with pytest.raises(InputError, match=r"_ReverseBackward.*lowrank is the pass") as e:
        _width(_model("untraceable"), target=0.5, scope="model", multiple=2)
    assert "\n" not in str(e.value)


def test_the_planner_proposes_graph_width_for_a_model_of_no_family(tmp_path):
    """A CNN no family knows (EfficientNet-Lite1 was one: only its int8 files were planned): the planner's width
    candidates reach it through the traced graph, and a FLOP target is met by one."""
    from compress.load.model import load
    from compress.planner.search import calibration_pair, plan

    save_file(_model("all").state_dict(), str(tmp_path / "w.safetensors"))
    r = parse_recipe({"version": 1, "model": {"arch": "graph_models:coupled", "kwargs": {"kind": "all"}, "img_size": 32},
                      "calibration": {"data": "random", "images": 8}, "target": {"flops": 0.6},
                      "report": {"latency": None}})
    loaded = load(str(tmp_path / "w.safetensors"), r.model)
    assert loaded.adapter.family == "other"
    calib, holdout = calibration_pair(None, loaded.data_cfg, r.calibration)
    res = plan(loaded, r, calib, log=lambda _m: None, holdout=holdout)
    width_rows = [x for x in res["rows"] if x["passes"] and "width" in x["passes"][-1]]
    assert width_rows and all(x["flops_ratio"] <= 0.6 for x in width_rows)
    assert any("width" in p for p in res["rows"][res["choice"]]["passes"])


def test_graph_widths_round_as_the_model_zoos_make_divisible():
    """The traced graph's CNN widths round as timm's make_divisible (nearest, never below 0.9x); rounding down halved
    mobilenet_v2's 16-wide early streams where the same network built narrower keeps them."""
    from timm.layers import make_divisible

    from compress.passes.width import _round

    allowed = list(range(8, 129, 8))
    for x in np.arange(5.0, 120.0, 0.37):
        assert _round(allowed, x, 0.9) == make_divisible(x, 8), x
    assert _round(allowed, 11.2, None) == 8 and _round(allowed, 11.2, 0.9) == 16
