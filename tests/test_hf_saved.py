"""Hugging Face directories as save_pretrained writes them: sharded, in half precision, any image classifier."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from compress.core.errors import InputError
from compress.load.model import load, load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe

transformers = pytest.importorskip("transformers")

FAST = {"min_runtime": None, "slim": False}
VIT = dict(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=48,
           num_labels=5)
# classes that have no rename into timm: taken as transformers builds them (the floor)
FLOOR = {
    "BeitForImageClassification": VIT,
    "Dinov2ForImageClassification": {**{k: v for k, v in VIT.items() if k != "intermediate_size"}, "mlp_ratio": 2},
    "ViTMSNForImageClassification": VIT,
    "SwinForImageClassification": dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2],
                                       window_size=4, num_labels=5),
    "ConvNextForImageClassification": dict(image_size=32, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5),
}


def save(tmp_path, cls: str, config: dict, dtype=torch.float32, shard: str | None = None):
    """A random-weight model saved by save_pretrained (in `dtype`, in shards of `shard` when given), and it in float32."""
    cfg_cls = getattr(transformers, cls.replace("ForImageClassification", "Config"))
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg_cls(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # default inits (zero biases, unit norms) would hide a wrong mapping
    folder = tmp_path / f"{cls}-{str(dtype)[6:]}"
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder, model.float()


def to_bin_shards(folder) -> None:
    """The same shards as pytorch_model-0000K-of-0000N.bin + pytorch_model.bin.index.json, as transformers < 5 wrote
    them (transformers 5 writes safetensors only)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    rename = {n: f"pytorch_model-{i:05d}-of-{len(names):05d}.bin" for i, n in enumerate(names, 1)}
    for n in names:
        torch.save(load_file(str(folder / n)), folder / rename[n])
        (folder / n).unlink()
    (folder / "model.safetensors.index.json").unlink()
    index["weight_map"] = {k: rename[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def run(tmp_path, folder, passes=(), name="out"):
    recipe = {"version": 1, "passes": list(passes), "report": {"latency": None}, "export": FAST,
              "calibration": {"data": "random"}}
    out = tmp_path / name
    return apply(parse_recipe(recipe), str(folder), out, log=lambda *_: None), out


def same_logits(model, rep, out):
    """model.onnx has one output, and it and load_compressed give the model's logits."""
    assert [o.name for o in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.output] == ["logits"]
    x = torch.randn(2, *rep["input_size"])
    with torch.no_grad():
        want = model(x).logits.numpy()
        np.testing.assert_allclose(load_compressed(out)(x).numpy(), want, atol=1e-4, rtol=1e-4)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    assert len(got) == 1
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)


def test_sharded_bf16_vit_converts_and_saves_back_in_float32(tmp_path):
    folder, model = save(tmp_path, "ViTForImageClassification", VIT, torch.bfloat16, shard="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    rep, out = run(tmp_path, folder)
    ck = rep["source"]["checkpoint"]
    shards = len(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards > 1 and ck["container"] == f"{shards} shards listed in model.safetensors.index.json"
    assert ck["dtype"] == {"saved": "bfloat16", "computed": "float32"} and "computed in float32" in rep["source"]["read"]
    assert rep["source"]["family"] == "vit"  # converted into timm form: every pass applies
    same_logits(model, rep, out)
    saved = json.loads((out / "hf" / "config.json").read_text())  # written back in float32, and says so
    assert saved.get("dtype", saved.get("torch_dtype")) == "float32"
    rep2, _ = run(tmp_path, folder, [{"lowrank": {"rank": 4, "layers": ["mlp"]}}], name="lowrank")
    assert rep2["summary"]["params"]["student"] < rep2["summary"]["params"]["teacher"]


def test_sharded_fp16_pytorch_bin_resnet(tmp_path):
    cfg = dict(embedding_size=64, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], layer_type="basic", num_labels=5)
    folder, model = save(tmp_path, "ResNetForImageClassification", cfg, torch.float16, shard="20KB")
    to_bin_shards(folder)
    loaded = load(str(folder))
    ck = loaded.source["checkpoint"]
    assert ck["format"] == "torch-zip" and "shards listed in pytorch_model.bin.index.json" in ck["container"]
    assert ck["dtype"] == {"saved": "float16", "computed": "float32"} and loaded.adapter.family == "resnet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x).logits, atol=1e-4, rtol=1e-4)


def test_shard_missing_is_one_line(tmp_path):
    folder, _ = save(tmp_path, "ViTForImageClassification", VIT, shard="20KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(InputError, match=r"lists shard model-00002-of-\d+\.safetensors, which is not in .*copy the whole"):
        load(str(folder))


@pytest.mark.parametrize("cls", FLOOR)
def test_other_image_classifiers_load_and_export(tmp_path, cls):
    dtype = torch.bfloat16 if cls < "Sw" else torch.float16
    folder, model = save(tmp_path, cls, FLOOR[cls], dtype, shard="20KB" if "Dinov2" in cls else None)
    rep, out = run(tmp_path, folder)
    src = rep["source"]
    assert src["read_as"] == f"hf:{cls}" and src["family"] == "other" and "as transformers builds it" in src["note"]
    assert src["checkpoint"]["dtype"]["saved"] == str(dtype)[6:]
    same_logits(model, rep, out)
