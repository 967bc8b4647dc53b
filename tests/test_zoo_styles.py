"""Hand-written models as public repositories write them (tests/zoo_models.py): each loads through
`module:factory`, exports alone (`passes: []`) with the logits as the ONNX file's one output, and takes a rewriting pass."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import zoo_models
from compress.core.errors import InputError
from compress.load.model import load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.load.sources.common import logits_of
from conftest import make_image_zip, random_bn_stats

# nn.TransformerEncoderLayer reads linear1/linear2.weight in its forward (the fast-path check), so lowrank may not
# replace them by factorised pairs: it refuses in one line (exit 2), the layers left are the stem and the head
# style -> family its blocks map to (None: none recognised, the model stands on the floor)
STYLES = {
    "per_head_qkv": "vit", "fused_qkv_named": "vit", "tuple_blocks": "vit", "hand_gelu": "vit", "no_final_norm": "vit",
    "post_norm": "vit", "tuple_output": "vit", "dict_output": "vit", "pair_list": None, "parts_called": "vit",
    "block_attr_read": None,
    "conv_bias_bn": "resnet", "identity_shortcut": "resnet", "avgpool_pad_shortcut": "resnet",
    "slice_shortcut": "resnet", "lambda_shortcut": None, "flat_blocks": "resnet", "preact": None,
}
ENCODERS = [(bf, nf) for bf in (True, False) for nf in (True, False)]  # nn.TransformerEncoder: batch_first x norm_first
FAST = {"min_runtime": None, "slim": False}  # the old-runtime check and onnxslim are tested elsewhere


def _jitter(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5 / p[0].numel() ** 0.5) if p.dim() >= 2 else p.normal_(0, 0.3)
    return random_bn_stats(model).eval()


def _run(tmp_path, name: str, passes: list, kwargs: dict | None = None, name_out: str = "out", **extra):
    model = _jitter(getattr(zoo_models, name)(**(kwargs or {})))
    ckpt = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    recipe = {"version": 1, "model": {"arch": f"zoo_models:{name}", "kwargs": kwargs or {}, "img_size": 32},
              "passes": passes, "report": {"latency": None}, "export": FAST, "calibration": {"data": "random"}, **extra}
    out = tmp_path / name_out
    return model, apply(parse_recipe(recipe), str(ckpt), out, log=lambda *_: None), out


def _check_export(model, rep, out):
    """One ONNX output, the logits; ONNX and load_compressed both give the original's logits."""
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert [o.name for o in proto.graph.output] == ["logits"]
    x = torch.randn(3 if rep["artifacts"]["onnx"]["dynamic_batch"] else 1, 3, 32, 32)
    with torch.no_grad():
        want = logits_of(model(x)).numpy()
        np.testing.assert_allclose(load_compressed(out)(x).numpy(), want, atol=1e-4, rtol=1e-4)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert len(got) == 1
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", STYLES)
def test_style_exports_alone(tmp_path, name):
    model, rep, out = _run(tmp_path, name, [])
    src = rep["source"]
    assert src["family"] == (STYLES[name] or "other")
    # nothing rewritten: the student goes back into your own keys (split or concatenated q/k/v included), reloaded
    assert rep["family_layout"]["path"] == "model.user.safetensors", rep["family_layout"]
    if name in ("tuple_output", "dict_output"):
        assert "the logits are taken" in src["output"] and ("tuple of 2" in src["output"]) == (name == "tuple_output")
    else:
        assert "output" not in src
    if name in ("avgpool_pad_shortcut", "slice_shortcut"):  # the downsampling block's shortcut is computed in forward
        assert [u.split(" ")[0] for u in src["unmapped"]] == ["layer2.0"]
        assert "the mapped form does not run in its place" in src["unmapped"][0]
    if name == "parts_called":
        assert all("never calls the block itself" in u for u in src["unmapped"]) and len(src["unmapped"]) == 2
    if name == "block_attr_read":  # each block maps alone; the model reads an attribute the mapped form lacks
        assert src["unmapped"][0].startswith("all blocks (converted, the whole model fails: AttributeError")
    _check_export(model, rep, out)


@pytest.mark.parametrize("batch_first,norm_first", ENCODERS)
def test_torch_transformer_encoder_exports_without_its_fast_path(tmp_path, batch_first, norm_first):
    kwargs = {"batch_first": batch_first, "norm_first": norm_first}
    model, rep, out = _run(tmp_path, "torch_encoder", [], kwargs)
    _check_export(model, rep, out)


@pytest.mark.parametrize("name", [*STYLES, "torch_encoder"])  # torch's encoder: rebuilt as plain modules at load
def test_style_takes_a_rewriting_pass(tmp_path, name):
    model, rep, out = _run(tmp_path, name, [{"lowrank": {"rank": 0.5}}])
    assert rep["summary"]["params"]["student"] < rep["summary"]["params"]["teacher"]
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4


@pytest.mark.parametrize("name", ["fused_qkv_named", "per_head_qkv", "conv_bias_bn", "avgpool_pad_shortcut", "preact"])
def test_width_where_it_applies(tmp_path, name):
    """Structured pruning on mapped styles (multiples of 4: the widths here are 8-32); a ResNet whose shortcut pads
    channels in forward, and a pre-activation one, by the traced channel graph."""
    model, rep, out = _run(tmp_path, name, [{"width": {"keep": 0.5, "multiple": 4}}])
    assert rep["summary"]["flops"]["student"] < rep["summary"]["flops"]["teacher"]
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4


@pytest.mark.parametrize("name", ["tuple_output", "dict_output"])
def test_logits_everywhere_calibration_distillation_evaluation(tmp_path, name):
    """A forward returning (logits, features) or {'logits', 'features'}: every stage reads the logits alone."""
    data = make_image_zip(tmp_path / "images.zip", classes=5, per_class=4, size=32, corrupt=0)
    model, rep, out = _run(tmp_path, name, [{"lowrank": {"rank": 0.5}}], calibration={"data": str(data)},
                           distill={"data": str(data), "steps": 2, "batch_size": 4, "workers": 0, "checkpoint_every": None,
                                    "device": "cpu"},
                           report={"latency": None, "eval_data": str(data)})
    assert "images.zip" in rep["calibration"] and rep["summary"]["eval"]["images"] == 20
    assert rep["distill"]["steps"] == 2 and len(rep["distill"]["loss_history"]) == 2
    assert [o.name for o in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.output] == ["logits"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert load_compressed(out)(x).shape == (2, 5)
