"""int8_static accuracy control: a layer made sensitive by an outlier channel stays float, the file meets the KL bound,
the plain int8 file does not; the calibration method is the one with the lowest KL."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.export.write import to_onnx, write_int8
from compress.export.quant import METHODS, controlled_static, quantize_static, ranked_nodes, Scorer


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1) for i in range(4))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        for c in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(c(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    """c2's output channel 0 is 1000x the others and c3 reads it 1000x smaller: the same function in float, but the
    tensor between them spends its 256 int8 steps on the one channel. Returns (fp32 file, calibration, held-out)."""
    torch.manual_seed(0)
    m = Convs().eval()
    with torch.no_grad():
        m.fc.weight *= 100  # logits with a spread, so that a lost feature shows in the KL
        m.c2.weight[0] *= 1000
        m.c2.bias[0] *= 1000
        m.c3.weight[:, 0] /= 1000
    folder = tmp_path_factory.mktemp("outlier")
    to_onnx(m, folder / "model.onnx", (3, 16, 16), opset=18, dynamic_batch=True)
    x = torch.randn(64, 3, 16, 16)
    return m, folder / "model.onnx", x[:32], x[32:]


def sensitive_model(seed: int = 0):
    """The outlier model with predictions that vary with the input: images of one colour each (the features a
    random net pools then differ image to image) and a head centred and scaled on them, so that the outlier's lost
    resolution changes top-1 and not only the KL. Returns (model, calibration, held-out)."""
    torch.manual_seed(seed)
    m = Convs().eval()
    x = torch.randn(64, 3, 1, 1) * 2 + 0.5 * torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        m.c2.weight[0] *= 1000
        m.c2.bias[0] *= 1000
        m.c3.weight[:, 0] /= 1000
        feats = []
        hook = m.fc.register_forward_hook(lambda _m, i, _o: feats.append(i[0]))
        m(x)
        hook.remove()
        m.fc.weight /= feats[0].std(0)
        m.fc.bias.copy_(-m.fc.weight @ feats[0].mean(0))
    return m, x[:32], x[32:]


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    """sensitive_model() as model.onnx: (model, fp32 file, calibration, held-out)."""
    m, calib, held = sensitive_model()
    folder = tmp_path_factory.mktemp("spread")
    to_onnx(m, folder / "model.onnx", (3, 16, 16), opset=18, dynamic_batch=True)
    return m, folder / "model.onnx", calib, held


def test_the_outlier_layer_stays_float_and_the_file_meets_the_bound(outlier, tmp_path):
    _, base, calib, held = outlier
    score = Scorer(base, held, threads=1)
    quantize_static(base, tmp_path / "plain.onnx", calib)
    plain = score(tmp_path / "plain.onnx")
    bound = plain / 20
    rec = controlled_static(base, tmp_path / "mixed.onnx", calib, held, bound, threads=1)
    assert plain > bound and not rec["plain_kl"] <= bound  # the plain int8 file misses the bound
    assert rec["meets"] and rec["kl"] <= bound and score(tmp_path / "mixed.onnx") == pytest.approx(rec["kl"])
    kept = [k["node"] for k in rec["kept_float"]]
    assert "/c2/Conv" in kept or "/c3/Conv" in kept  # the outlier tensor's writer or reader
    assert set(kept) <= {"/c2/Conv", "/c3/Conv"}, kept  # and nothing else: the other layers quantize well
    assert len(ranked_nodes(base)) == rec["layers_ranked"] == 5
    sens = {k["node"]: k["kl_alone"] for k in rec["kept_float"]}
    assert min(sens.values()) > 100 * max(1e-12, rec["kl"])  # each kept layer alone costs far more than the file
    assert set(rec["methods_kl"]) == set(METHODS) and rec["methods_kl"][rec["method"]] == min(rec["methods_kl"].values())


def test_a_bound_the_plain_file_meets_keeps_every_layer_int8(outlier, tmp_path):
    _, base, calib, held = outlier
    rec = controlled_static(base, tmp_path / "q.onnx", calib, held, 10.0, threads=1, methods=("minmax",))
    assert rec["kept_float"] == [] and rec["meets"] and "layers_ranked" not in rec


def test_write_int8_records_the_accuracy_control(outlier, tmp_path):
    """Through the exporter (as export.int8_max_kl does): the mixed file is verified on the installed and the oldest
    runtime (export.min_runtime 1.16, as every file) and the record says what stayed float."""
    from compress.export import runtimes

    m, base, calib, held = outlier
    with torch.no_grad():
        ref = m(calib)
    rec = write_int8(base, tmp_path / "model.int8_static.onnx", "int8_static", ref, calib, min_agreement=0.5,
                     threads=1, max_kl=1e-3, held=held, old=runtimes.prepare("1.16"))
    ctl = rec["accuracy_control"]
    assert ctl["meets"] and ctl["kept_float"] and "note" not in rec and "QuantizeLinear" in rec["operators"]
    assert rec["oldest_runtime"] == "1.16.3"
    from compress.report.write import int8_control

    assert "kept float: /c" in int8_control(ctl) and f"<= {1e-3:.3g}" in int8_control(ctl)


def _recipe(**sections):
    from compress.recipe import parse_recipe

    return parse_recipe({"version": 1, **sections})


def test_the_bound_from_max_top1_drop_is_met_where_plain_int8_is_not(spread, tmp_path):
    """No export.int8_max_kl, gates.max_top1_drop D: the file may change at most QUANT_SHARE * D % of the held-out
    predictions of model.onnx; the outlier layer stays float to get there, and the record says whence the bound."""
    from compress.export.quant import QUANT_SHARE, bound_for
    from compress.report.write import int8_control

    _, base, calib, held = spread
    quantize_static(base, tmp_path / "plain.onnx", calib)
    plain = 1 - Scorer(base, held, threads=1).fidelity(tmp_path / "plain.onnx")["agreement"]
    assert plain > 0  # the outlier costs the plain file some predictions
    drop = 100 * plain / QUANT_SHARE / 2  # a budget whose share is half of what the plain file changes
    r = _recipe(export={"quantize": ["int8_static"]}, gates={"max_top1_drop": drop})
    bound = bound_for(r.export, r.gates, r.target)
    assert bound.metric == "disagreement" and bound.value == pytest.approx(plain / 2)
    assert "gates.max_top1_drop" in bound.source
    rec = controlled_static(base, tmp_path / "mixed.onnx", calib, held, bound, threads=1)
    assert rec["plain_disagreement"] > bound.value  # plain int8 misses it (its best calibration too)
    assert rec["meets"] and rec["disagreement"] <= bound.value and rec["kept_float"]
    after = Scorer(base, held, threads=1).fidelity(tmp_path / "mixed.onnx")
    assert 1 - after["agreement"] == pytest.approx(rec["disagreement"])
    line = int8_control(rec)
    assert "bound disagreement <=" in line and "gates.max_top1_drop" in line and "kept float: /c" in line


def test_explicit_int8_max_kl_wins_over_the_derived_bound():
    from compress.export.quant import QUANT_SHARE, bound_for

    def bound(**sections):
        r = _recipe(**sections)
        return bound_for(r.export, r.gates, r.target)

    gates = {"max_top1_drop": 2.0}
    target = {"flops": 0.5, "max_top1_drop": 2.0}
    ev = {"eval_data": "images.zip"}
    b = bound(export={"quantize": ["int8_static"], "int8_max_kl": 0.01}, gates=gates)
    assert (b.metric, b.value, b.source) == ("kl", 0.01, "export.int8_max_kl")
    b = bound(export={"quantize": ["int8_static"], "int8_max_disagreement": 0.002}, target=target, report=ev)
    assert (b.metric, b.value, b.source) == ("disagreement", 0.002, "export.int8_max_disagreement")
    b = bound(export={"quantize": ["int8_static"]}, target=target, report=ev)
    assert b.metric == "disagreement" and b.value == pytest.approx(QUANT_SHARE * 0.02) and "target.max_top1_drop" in b.source
    assert bound(export={"quantize": ["int8_static"]}) is None  # no bound, no target: plain minmax as before


CFG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0,
       "interpolation": "bilinear"}


@pytest.fixture(scope="module")
def rounding(tmp_path_factory):
    """A model int8 rounding hurts and training can help: in c2 and c3 one weight per output channel is 100x the
    others (they share a few of the channel's int8 steps), on images of one colour each (pooled features that vary).
    Returns (model, fp32 file, training data, calibration, held-out)."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from compress.load.data import calibration_batch, dataset

    folder = tmp_path_factory.mktemp("rounding")
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(folder / "images.zip", "w") as z:
        for i in range(96):
            img = rng.uniform(0, 255, (1, 1, 3)) + rng.normal(0, 30, (16, 16, 3))
            buf = io.BytesIO()
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="PNG")
            z.writestr(f"data/c{i % 3}/{i:03d}.png", buf.getvalue())
    calib = calibration_batch(folder / "images.zip", CFG, 32, 0)[0]
    held = calibration_batch(folder / "images.zip", CFG, 32, 0, holdout=True)[0]
    torch.manual_seed(0)
    m = Convs().eval()
    with torch.no_grad():
        for c in (m.c2, m.c3):
            c.weight[:, 0, 1, 1] *= 100
        m.fc.weight *= 10
    to_onnx(m, folder / "model.onnx", (3, 16, 16), opset=18, dynamic_batch=True)
    return m, folder / "model.onnx", dataset(folder / "images.zip", CFG), calib, held


def _distill_spec(**kw):
    from compress.recipe import DistillSpec

    return DistillSpec(lr=1e-3, batch_size=16, workers=0, warmup_steps=0, **kw)


def test_qat_brings_the_int8_file_closer_than_ptq(rounding, tmp_path):
    """Fake int8 in the forward while distilling from the teacher (here the model itself): the same onnxruntime
    static quantization of the QAT weights is closer to model.onnx than that of the original weights."""
    import copy

    from compress.distill.qat import finetune

    m, base, train, calib, held = rounding
    q, stats = finetune(m, copy.deepcopy(m), train, _distill_spec(), 30, calib, device=torch.device("cpu"),
                        log=lambda *a: None)
    assert stats["steps"] == 30 and not any("_qat" in k or "parametrizations" in k for k in q.state_dict())
    to_onnx(q, tmp_path / "qat.onnx", (3, 16, 16), opset=18, dynamic_batch=True)
    score = Scorer(base, held, threads=1)
    quantize_static(base, tmp_path / "ptq.int8.onnx", calib)
    quantize_static(tmp_path / "qat.onnx", tmp_path / "qat.int8.onnx", calib)
    assert score(tmp_path / "qat.int8.onnx") < score(tmp_path / "ptq.int8.onnx")


def test_int8_qat_runs_when_ptq_misses_and_says_which_file_ships(rounding, tmp_path):
    """export.int8_qat_steps through int8_qat: the plain PTQ file misses its bound, so QAT runs; the record has the
    distance before (PTQ, float layers included) and after (QAT), the file kept is the better one and it is the
    one on disk; a bound the plain file meets runs no QAT."""
    import copy

    from compress.distill.qat import int8_qat
    from compress.export.quant import Bound
    from compress.recipe import ExportSpec
    from compress.report.write import int8_control

    m, base, train, calib, held = rounding
    path = tmp_path / "model.int8_static.onnx"
    with torch.no_grad():
        ref = m(calib)
    plain = Scorer(base, held, threads=1)
    quantize_static(base, tmp_path / "plain.onnx", calib)
    bound = Bound("kl", plain(tmp_path / "plain.onnx") / 2, "test")
    ptq = write_int8(base, path, "int8_static", ref, calib, min_agreement=0.5, threads=1, bound=bound, held=held)
    ex = ExportSpec(quantize=["int8_static"], int8_min_agreement=0.5, min_runtime=None, int8_qat_steps=30)
    rec = int8_qat(ptq, base, path, student=m, teacher=copy.deepcopy(m), train=train, d=_distill_spec(), steps=30,
                   bound=bound, calib=calib, held=held, ex=ex, log=lambda *a: None)
    qat = rec["accuracy_control"]["qat"]
    before = ptq["accuracy_control"]
    assert qat["before"]["kl"] == before["kl"] and qat["before"]["kept_float"] == len(before["kept_float"])
    after = qat["after"]
    better = (not after["meets"], after["kept_float"], after["kl"]) < (not before["meets"], len(before["kept_float"]),
                                                                       before["kl"])
    assert qat["used"] == ("qat 30 steps" if better else "ptq")
    assert plain(path) == pytest.approx(rec["accuracy_control"]["kl"])  # the file on disk is the one recorded
    assert f"used: {qat['used']} (before: ptq kl " in int8_control(rec["accuracy_control"])
    easy = write_int8(base, path, "int8_static", ref, calib, min_agreement=0.5, threads=1,
                      bound=Bound("kl", 10.0, "test"), held=held)
    assert int8_qat(easy, base, path, student=m, teacher=m, train=train, d=_distill_spec(), steps=30,
                    bound=Bound("kl", 10.0, "test"), calib=calib, held=held, ex=ex)["accuracy_control"]["qat"]["used"] == "ptq"
