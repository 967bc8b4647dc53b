"""Model sources: Hugging Face, torchvision and user architectures are converted, verified and compressed."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from compress.core.errors import InputError, VerificationError
from compress.load.model import load, load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from compress.load.sources import hf
from compress.load.sources.detect import guess_arch
from compress.run.verify import verify
from tests.conftest import random_bn_stats

transformers = pytest.importorskip("transformers")

LAT = {"latency": None}  # timing is tested elsewhere; these tests are about reading and converting
# Every shipped pass that applies to the family, split over two recipes where passes compete for the
# same block: exact rewrites + lowrank, then the approximate attention rewrites + tying + auto stripping.
VIT_RECIPES = {
    "exact": [{"qk_merge": {"mode": "exact", "blocks": [0], "allow_growth": True}},
              {"vo": {"mode": "fold", "blocks": [0], "allow_growth": True}}, {"attn_diffusion": {}},
              {"mlp_strip": {"blocks": [1]}}, {"lowrank": {"rank": 8, "layers": ["mlp"]}}],
    "approx": [{"qk_merge": {"mode": "symmetric", "rank": 4, "blocks": [0], "allow_growth": True}},
               {"vo": {"mode": "remove", "blocks": [0], "allow_growth": True}}, {"crate": {"mode": "mssa", "blocks": [1]}},
               {"tie_rowcol": {}}, {"mlp_strip": {"blocks": "auto", "fraction": 0.5}}],
}
RESNET_PASSES = [{"tie_rowcol": {}}, {"lowrank": {"rank": 8, "layers": ["conv"]}}]
VIT_HF = dict(image_size=16, patch_size=8, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
              intermediate_size=48, num_labels=5)
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in scaled weights, random biases and BN statistics: default inits make equivalence checks vacuous."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.5 / p[0].numel() ** 0.5)
            else:
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3 if "norm" in name else 0.5)
    return random_bn_stats(model).eval()


def hf_dir(tmp_path, cls: str, config: dict, image_size: int | None = None):
    cfg_cls = getattr(transformers, cls.replace("ForImageClassificationWithTeacher", "Config").replace("ForImageClassification", "Config"))
    model = jitter(getattr(transformers, cls)(cfg_cls(**config)))
    folder = tmp_path / cls
    model.save_pretrained(folder)
    if image_size:  # what the model's image processor would save
        (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": image_size}, **IMAGENET}))
    return folder, model


def run(tmp_path, ckpt, passes, model=None, name="out", onnx=True):
    recipe = {"version": 1, "passes": passes, "report": LAT, **({"model": model} if model else {}),
              "calibration": {"data": "random"},  # random weights: random inputs, asked for
              **({} if onnx else {"export": {"formats": ["safetensors"]}})}
    out = tmp_path / name
    rep = apply(parse_recipe(recipe), str(ckpt), out, log=lambda *_: None)
    return out, rep


def run_all(tmp_path, ckpt, vit: bool, size, model=None):
    """Compress with every applicable pass (two ViT recipes, one ResNet recipe) and check each result."""
    recipes = VIT_RECIPES if vit else {"resnet": RESNET_PASSES}
    for name, passes in recipes.items():
        out, rep = run(tmp_path, ckpt, passes, model=model, name=name)
        assert [e["pass"] for e in rep["passes"]] == [next(iter(p)) for p in passes]
        assert not any("skipped" in e for e in rep["passes"])
        check_result(out, rep, size)
    return out, rep


def check_result(out, rep, size):
    """Exact passes stayed exact, ONNX matches PyTorch, and load_compressed rebuilds the same function."""
    for e in rep["passes"]:
        if e["exact"]:
            assert e["verified"]["rel_diff"] <= 1e-4
    assert rep["artifacts"]["onnx"]["parity"]["rel_diff"] <= 1e-4
    x = torch.randn(3, *size)
    onnx_out = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(load_compressed(out)(x).numpy(), onnx_out, atol=1e-4, rtol=1e-4)


HF_CASES = {"ViTForImageClassification": VIT_HF, "DeiTForImageClassification": VIT_HF,
            "DeiTForImageClassificationWithTeacher": VIT_HF,
            # bottleneck with the stride on the first 1x1 conv, the case timm cannot build directly
            "ResNetForImageClassification": dict(embedding_size=64, hidden_sizes=[32, 48, 64, 96], depths=[1, 2, 1, 1],
                                                 layer_type="bottleneck", downsample_in_bottleneck=True, num_labels=5)}


@pytest.mark.parametrize("cls", list(HF_CASES))
def test_hf_checkpoint_compresses_and_saves_back(tmp_path, cls):
    resnet = cls.startswith("ResNet")
    folder, original = hf_dir(tmp_path, cls, HF_CASES[cls], image_size=32 if resnet else None)
    size = (3, 32, 32) if resnet else (3, 16, 16)
    out, rep = run_all(tmp_path, folder, not resnet, size)
    assert rep["source"]["read_as"] == f"hf:{cls}" and rep["input_size"] == list(size)
    # the passes changed the structure: no HF directory, and the report says why
    assert "skipped" in rep["family_layout"] and not (out / "hf").exists()
    # structure unchanged (export only): an HF directory that from_pretrained reads, same logits as the original
    out2, rep2 = run(tmp_path, folder, [], name="plain", onnx=False)
    assert rep2["family_layout"]["path"] == "hf"
    again = getattr(transformers, cls).from_pretrained(str(out2 / "hf")).eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, original(x).logits, atol=1e-5, rtol=1e-5)
    # compress verify hashes the HF directory as the report did (it once called the directory missing)
    assert verify(out2)["hashes"] == 2
    (out2 / "hf" / "config.json").write_text((out2 / "hf" / "config.json").read_text() + " ")
    with pytest.raises(VerificationError, match="hf changed"):
        verify(out2)


def test_hf_conversion_that_changes_the_function_is_refused(tmp_path, monkeypatch):
    folder, _ = hf_dir(tmp_path, "ResNetForImageClassification", HF_CASES["ResNetForImageClassification"], 32)
    real = hf._resnet_base
    monkeypatch.setattr(hf, "_resnet_base", lambda c, sd, where: {**real(c, sd, where), "fixups": {}})
    with pytest.raises(InputError, match="converted model differs from the original"):
        load(str(folder))


def test_torchvision_resnet18_by_name_and_by_its_keys(tmp_path):
    m = jitter(torchvision.models.resnet18(num_classes=10))
    ckpt = tmp_path / "resnet18.safetensors"
    save_file(m.state_dict(), str(ckpt))
    run_all(tmp_path, ckpt, False, (3, 32, 32), model={"arch": "torchvision:resnet18", "img_size": 32})
    out, rep = run(tmp_path, ckpt, [], model={"arch": "torchvision:resnet18", "img_size": 32})
    check_result(out, rep, (3, 32, 32))
    assert rep["source"]["read_as"] == "torchvision:resnet18" and rep["family_layout"]["path"] == "model.safetensors"
    back = torchvision.models.resnet18(num_classes=10).eval()
    back.load_state_dict(load_file(str(out / "model.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x))
    assert guess_arch(load_file(str(ckpt)), ckpt) == ("torchvision:resnet18", {})  # no model section: the keys say it


def test_torchvision_vit(tmp_path):
    m = jitter(torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                   mlp_dim=32, num_classes=10))
    ckpt = tmp_path / "vit.pth"
    torch.save(m.state_dict(), ckpt)
    model = {"arch": "torchvision:vit_b_16", "kwargs": {"num_heads": 2}}
    run_all(tmp_path, ckpt, True, (3, 32, 32), model=model)
    out2, rep2 = run(tmp_path, ckpt, [], model=model, name="plain", onnx=False)
    assert rep2["family_layout"]["path"] == "model.torchvision.safetensors"
    back = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=10).eval()
    back.load_state_dict(load_file(str(out2 / "model.torchvision.safetensors")))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("factory", ["vit", "resnet"])
def test_user_architecture(tmp_path, factory):
    import user_models

    m = jitter(getattr(user_models, factory)())
    ckpt = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ckpt))
    vit = factory == "vit"
    spec = {"arch": f"user_models:{factory}", **({} if vit else {"img_size": 32})}  # a ViT's size is in its weights
    out, rep = run_all(tmp_path, ckpt, vit, (3, 16, 16) if vit else (3, 32, 32), model=spec)
    assert rep["source"]["family"] == ("vit" if vit else "resnet") and rep["source"]["adapter"].startswith("user-")
    size = (3, 16, 16) if vit else (3, 32, 32)
    assert rep["input_size"] == list(size)
    # export only: the student saved back in the user's own keys loads into a fresh factory model
    out2, rep2 = run(tmp_path, ckpt, [], model=spec, name="plain", onnx=False)
    assert rep2["family_layout"]["path"] == "model.user.safetensors"
    back = getattr(user_models, factory)().eval()
    back.load_state_dict(load_file(str(out2 / "model.user.safetensors")))
    x = torch.randn(2, *size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), m(x), atol=1e-5, rtol=1e-5)
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    if vit:  # heads and activation were found numerically for the fused-qkv blocks, read for the nn.MultiheadAttention one
        conv = loaded.source["base"]["conversion"]
        assert conv["blocks"] == {f"layers.{i}": {"heads": 2, "act": "gelu_tanh"} for i in range(3)}
        assert [n for n, _ in loaded.adapter.layers(loaded.model)][:6] == [
            "layers.0.attn.score.q", "layers.0.attn.score.k", "layers.0.attn.value.v", "layers.0.attn.value.proj",
            "layers.0.mlp.fc1", "layers.0.mlp.fc2"]
    else:
        blocks = loaded.adapter.res_blocks(loaded.model)
        assert len(blocks) == 3 and blocks[1].downsample is not None and blocks[0].downsample is None
        kinds = dict(loaded.adapter.layers(loaded.model))
        assert kinds["stem.0"] == "stem" and kinds["body.0.conv1"] == "conv" and kinds["fc"] == "head"


def test_user_block_that_cannot_be_mapped_is_named(tmp_path):
    import user_models

    m = jitter(user_models.vit(post_norm_block=2))
    ckpt = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ckpt))
    spec = {"arch": "user_models:vit", "kwargs": {"post_norm_block": 2}}
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    assert "layers.2" in loaded.source["note"] and "cannot run" in loaded.source["note"]
    with pytest.raises(InputError, match=r"blocks layers\.2 .*could not be mapped"):
        run(tmp_path, ckpt, [{"mlp_strip": {"blocks": [0]}}], model=spec)
    out, rep = run(tmp_path, ckpt, [], model=spec)  # export still works, and reloads
    check_result(out, rep, (3, 16, 16))


def test_keys_of_no_known_family(tmp_path):
    ckpt = tmp_path / "odd.safetensors"
    save_file({"encoder.w1": torch.ones(2, 2), "decoder.w2": torch.ones(2)}, str(ckpt))
    with pytest.raises(InputError) as e:
        load(str(ckpt))
    msg = str(e.value)
    assert "\n" not in msg and "match no known family" in msg and "timm ViT" in msg and "decoder.w2, encoder.w1" in msg


def test_hf_hub_id_offline_fails_at_once(monkeypatch):
    import compress.load.model as ld

    monkeypatch.setattr(ld, "_hub_reachable", lambda: False)
    with pytest.raises(InputError, match="cannot reach the model hub to fetch hf:google/vit-base-patch16-224.*local"):
        load("hf:google/vit-base-patch16-224")


def test_a_dotted_factory_reaches_a_class_method(tmp_path):
    """`module:Class.method`, as EfficientNet-PyTorch is built (`EfficientNet.from_name(...)`); a missing part of
    the dotted name is the same one line as a missing function."""
    import user_models

    m = jitter(user_models.TinyResNet.from_name("small"))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    spec = {"arch": "user_models:TinyResNet.from_name", "kwargs": {"name": "small"}, "img_size": 32}
    loaded = load(str(tmp_path / "w.safetensors"), parse_recipe({"version": 1, "model": spec}).model)
    assert loaded.model.fc.in_features == 32
    with pytest.raises(InputError, match="has no callable 'TinyResNet.from_nam'"):
        load(str(tmp_path / "w.safetensors"), parse_recipe({"version": 1, "model": {**spec, "arch": "user_models:TinyResNet.from_nam"}}).model)


def test_inspect_of_a_model_of_no_family_lists_every_pass(tmp_path):
    """A CNN no family knows (`module:factory`): inspect tries every pass; the symmetric qk_merge asked the model's
    width before finding no transformer blocks, and the whole inspect was exit 1 (EfficientNet-Lite1)."""
    from compress import api

    m = jitter(__import__("graph_models").coupled("all"))
    save_file(m.state_dict(), str(tmp_path / "w.safetensors"))
    recipe = {"version": 1, "model": {"arch": "graph_models:coupled", "kwargs": {"kind": "all"}, "img_size": 32}}
    info = api.inspect(tmp_path / "w.safetensors", recipe=recipe)
    assert info["passes"]["qk_merge symmetric"] == {"applies": False, "why": "this model has no transformer blocks"}
    assert "flops" in info["passes"]["width"]


def test_blocks_unmapped_for_one_reason_are_named_once():
    """EfficientNet-Lite1's 21 blocks, one reason each, were a 5,000-character load note; now one group."""
    from compress.adapters.user import unmapped_text

    many = [f"_blocks.{i} (part _swish (ReLU6) is neither a conv+BN pair)" for i in range(21)]
    assert unmapped_text(many) == "_blocks.0, _blocks.1, ..., _blocks.20 (21 blocks: part _swish (ReLU6) is neither a conv+BN pair)"
    assert unmapped_text(["a (x)", "b (x)", "c (y)", "d"]) == "a, b (x); c (y); d"
