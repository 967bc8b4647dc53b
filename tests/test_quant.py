"""int8_static accuracy control: a layer made sensitive by an outlier channel stays float, the file meets the KL bound,
the plain int8 file does not; the calibration method is the one with the lowest KL."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.export import to_onnx, write_int8
from compress.quant import METHODS, controlled_static, quantize_static, ranked_nodes, Scorer


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
    from compress import runtimes

    m, base, calib, held = outlier
    with torch.no_grad():
        ref = m(calib)
    rec = write_int8(base, tmp_path / "model.int8_static.onnx", "int8_static", ref, calib, min_agreement=0.5,
                     threads=1, max_kl=1e-3, held=held, old=runtimes.prepare("1.16"))
    ctl = rec["accuracy_control"]
    assert ctl["meets"] and ctl["kept_float"] and "note" not in rec and "QuantizeLinear" in rec["operators"]
    assert rec["oldest_runtime"] == "1.16.3"
    from compress.report import int8_control

    assert "kept float: /c" in int8_control(ctl) and f"<= {1e-3:.3g}" in int8_control(ctl)
