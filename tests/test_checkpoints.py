"""Checkpoints as people have them: read by content, unwrapped, repaired, preprocessed, exported, verified."""
from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import user_models
from compress.load import checkpoint
from compress.cli import app
from compress.load.data import calibration_batch
from compress.core.errors import InputError
from compress.export.write import write_onnx
from compress.core.limits import check_memory
from compress.load.model import load, load_compressed
from compress.run.pipeline import apply
from compress.recipe import parse_recipe
from conftest import random_bn_stats, tiny_vit, tiny_vit_args

LAT = {"latency": None}


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fan-in scaled weights, random biases and BN statistics, so that equivalence checks are not vacuous."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 1.5 / p[0].numel() ** 0.5) if p.dim() >= 2 else p.normal_(0, 0.3)
    return random_bn_stats(model).eval()


def convert(tmp_path, ckpt, model: dict, original, size, passes=(), name="out", **extra) -> dict:
    """Run the pipeline in-process; model.onnx and the rebuilt safetensors must match `original` within 1e-4."""
    recipe = {"version": 1, "model": model, "passes": list(passes), "report": LAT, **extra}
    out = tmp_path / name
    rep = apply(parse_recipe(recipe), str(ckpt), out, log=lambda *_: None)
    batch = 3 if rep["artifacts"]["onnx"]["dynamic_batch"] else 1
    x = torch.randn(batch, *size)
    with torch.no_grad():
        want = original(x).numpy()
        np.testing.assert_allclose(load_compressed(out)(x).numpy(), want, atol=1e-4, rtol=1e-4)
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    return rep


def test_legacy_format_named_th(tmp_path):
    m = tiny_vit()
    ckpt = tmp_path / "vit.th"
    torch.save(m.state_dict(), ckpt, _use_new_zipfile_serialization=False)
    assert checkpoint.sniff(ckpt) == "torch-legacy"
    args = {k: v for k, v in tiny_vit_args().items() if k not in ("num_classes", "img_size")}
    rep = convert(tmp_path, ckpt, {"arch": "timm:vit_tiny_patch16_224", "num_classes": 5, "img_size": 16, "kwargs": args},
                  m, (3, 16, 16))
    assert rep["source"]["checkpoint"] == {"format": "torch-legacy", "container": "a plain state dict", "repairs": []}


def test_state_dict_without_batch_counts_nested_with_module_prefix(tmp_path):
    m = jitter(user_models.resnet())
    sd = {f"module.{k}": v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    ckpt = tmp_path / "resnet.pth.tar"
    torch.save({"epoch": 90, "arch": "resnet", "best_prec1": np.float64(91.3), "curve": np.arange(3.0), "state_dict": sd}, ckpt)
    rep = convert(tmp_path, ckpt, {"arch": "user_models:resnet", "img_size": 32}, m, (3, 32, 32))
    read = rep["source"]["checkpoint"]
    assert read["format"] == "torch-zip" and read["container"] == "'state_dict'"
    assert read["repairs"][0] == f"key prefix 'module.' removed from all {len(sd)} keys"
    assert "num_batches_tracked filled with 0 for 8 BatchNorm layers" in read["repairs"][1]
    assert "'state_dict'" in rep["source"]["read"] and "repaired" in rep["source"]["read"]


def test_lightning_ckpt_and_ema_choice(tmp_path):
    m, ema = tiny_vit(seed=0), tiny_vit(seed=1)
    ckpt = tmp_path / "epoch=3-step=100.ckpt"
    torch.save({"epoch": 3, "global_step": 100, "pytorch-lightning_version": "2.4.0", "optimizer_states": [],
                "state_dict": {f"model.{k}": v for k, v in m.state_dict().items()},
                "model_ema": {f"model.{k}": v for k, v in ema.state_dict().items()}}, ckpt)
    args = {k: v for k, v in tiny_vit_args().items() if k not in ("num_classes", "img_size")}
    spec = {"arch": "timm:vit_tiny_patch16_224", "num_classes": 5, "img_size": 16, "kwargs": args}
    rep = convert(tmp_path, ckpt, spec, m, (3, 16, 16))
    assert rep["source"]["checkpoint"]["container"].startswith("'state_dict' (Lightning checkpoint, version 2.4.0)")
    assert "model.weights_key: ema" in rep["source"]["checkpoint"]["container"]
    rep = convert(tmp_path, ckpt, {**spec, "weights_key": "ema"}, ema, (3, 16, 16), name="ema")
    assert rep["source"]["checkpoint"]["container"] == "'model_ema', as model.weights_key 'ema' asks"


def test_containers_by_content_not_name(tmp_path):
    m = tiny_vit()
    odd = tmp_path / "weights.model"  # safetensors content under a name that says nothing
    save_file(m.state_dict(), str(odd))
    assert checkpoint.read(odd)[1]["format"] == "safetensors"
    bare = tmp_path / "weights"  # no extension, a container key nobody knows
    torch.save({"step": 7, "trainer": {"student_weights": m.state_dict()}}, bare)
    sd, info = checkpoint.read(bare)
    assert set(sd) == set(m.state_dict()) and "'trainer.student_weights', the one mapping" in info["container"]
    two = tmp_path / "two.pt"
    torch.save({"a": m.state_dict(), "b": m.state_dict()}, two)
    with pytest.raises(InputError, match="several mappings of tensors .*model.weights_key"):
        checkpoint.read(two)
    with pytest.raises(InputError, match="model.weights_key 'ema': .* has no such mapping"):
        checkpoint.read(odd, "ema")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(InputError, match="neither safetensors nor a PyTorch checkpoint"):
        checkpoint.read(text)


def test_pickled_code_is_refused_whatever_the_name(tmp_path):
    evil = tmp_path / "model.tar"
    evil.write_bytes(pickle.dumps({"w": torch.ones(2), "f": print}, protocol=2))
    with pytest.raises(InputError, match="refusing to load .*could run code"):
        checkpoint.read(evil)


def test_batch_reading_forward_exports_with_dynamo(tmp_path):
    m = jitter(user_models.vit_len())
    ckpt = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ckpt))
    rep = convert(tmp_path, ckpt, {"arch": "user_models:vit_len"}, m, (3, 16, 16))
    onnx = rep["artifacts"]["onnx"]
    assert onnx["dynamic_batch"] and onnx["exporter"] == "dynamo" and "fails at batch 16" in onnx["traced_batch_baked"]
    # int(x.shape[0]) instead of len(x): the same repair, checked on the writer alone
    m2 = jitter(user_models.vit_len(as_int=True))
    save_file(m2.state_dict(), str(ckpt))
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": {"arch": "user_models:vit_len", "kwargs": {"as_int": True}}}).model)
    got = write_onnx(loaded.model, tmp_path / "m.onnx", torch.randn(4, 3, 16, 16), opset=18, dynamic_batch=True, tol=1e-4)
    assert got["dynamic_batch"] and got["exporter"] == "dynamo" and got["parity"]["images"] == 4


def test_fixed_batch_when_dynamo_fails_too(tmp_path, monkeypatch):
    import compress.export.write as ex

    def refuse(*_a, **_k):
        raise RuntimeError("data-dependent batch size")

    monkeypatch.setattr(ex, "_dynamo_onnx", refuse)
    m = jitter(user_models.vit_len())
    ckpt = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ckpt))
    lines = []
    recipe = {"version": 1, "model": {"arch": "user_models:vit_len"}, "export": {"quantize": "int8_dynamic"},
              "report": {"latency": {"batch_sizes": [1, 8], "threads": 1, "warmup": 0, "runs": 2}}}
    rep = apply(parse_recipe(recipe), str(ckpt), tmp_path / "out", log=lines.append)
    onnx = rep["artifacts"]["onnx"]
    assert not onnx["dynamic_batch"] and "data-dependent batch size" in onnx["fixed_batch"]
    assert any("batches of 1 only" in line for line in lines)
    assert list(rep["summary"]["latency"]) == ["1"] and "batch 1 only" in rep["summary"]["latency_note"]
    x = torch.randn(1, 3, 16, 16)
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m(x).numpy(), atol=1e-4, rtol=1e-4)


def gray_zip(path, classes: int = 3, per_class: int = 4, side: int = 28):
    """An ImageFolder zip of 28x28 grayscale PNGs, with one RGB image among them (converted on reading)."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as z:
        for c in range(classes):
            for i in range(per_class):
                shape, mode = ((side, side, 3), "RGB") if i == 0 and c == 0 else ((side, side), "L")
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buf, format="PNG")
                z.writestr(f"digits/{c}/{i}.png", buf.getvalue())
    return path


def test_grayscale_28px_model_with_own_preprocessing(tmp_path):
    m = jitter(user_models.small_cnn())
    ckpt = tmp_path / "mnist_cnn.pt"
    torch.save(m.state_dict(), ckpt)
    data = gray_zip(tmp_path / "digits.zip")
    spec = {"arch": "user_models:small_cnn", "preprocess": {"input_size": [1, 28, 28], "mean": [0.5], "std": [0.5]}}
    loaded = load(str(ckpt), parse_recipe({"version": 1, "model": spec}).model)
    assert loaded.data_cfg["input_size"] == (1, 28, 28) and loaded.data_cfg["mean"] == (0.5,)
    x, _ = calibration_batch(data, loaded.data_cfg, 12, 0)
    img = np.asarray(Image.open(io.BytesIO(zipfile.ZipFile(data).read("digits/0/1.png"))), dtype=np.float32) / 255
    assert x.shape == (12, 1, 28, 28) and torch.allclose(x[1, 0], torch.from_numpy((img - 0.5) / 0.5), atol=1e-6)
    lines = []
    recipe = {"version": 1, "model": spec, "calibration": {"data": str(data)}, "report": {"latency": None, "eval_data": str(data)},
              "distill": {"data": str(data), "steps": 2, "batch_size": 4, "workers": 0, "checkpoint_every": None, "device": "cpu"}}
    rep = apply(parse_recipe(recipe), str(ckpt), tmp_path / "out", log=lines.append)
    assert rep["input_size"] == [1, 28, 28] and rep["source"]["preprocess"]["std"] == [0.5]
    assert "3 class folders but the model has 10 outputs" in rep["summary"]["eval"]["warning"]
    assert any(line.startswith("warning: ") and "10 outputs" in line for line in lines)
    # no recognised blocks: it loads, exports and distills; a block pass refuses, naming the module types seen;
    # lowrank works on its plain layers, found by structure
    assert "module types seen: AdaptiveAvgPool2d, BatchNorm2d, Conv2d" in rep["source"]["note"]
    with pytest.raises(InputError, match="pass 'vo' does not apply .*no transformer blocks .*module types seen: .*MaxPool2d.*lowrank works"):
        apply(parse_recipe({**recipe, "passes": [{"vo": {"mode": "fold"}}], "distill": None}), str(ckpt), tmp_path / "o2",
              log=lambda *_: None)
    low = apply(parse_recipe({**recipe, "passes": [{"lowrank": {"rank": 4}}], "distill": None}), str(ckpt),
                tmp_path / "o3", log=lambda *_: None)
    assert low["passes"][0]["details"]["layers"]
    convert(tmp_path, ckpt, spec, m, (1, 28, 28), name="plain")


def test_parameter_free_shortcut_block_is_listed_unmapped(tmp_path):
    m = jitter(user_models.cifar_resnet())
    ckpt = tmp_path / "resnet20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, ckpt,
               _use_new_zipfile_serialization=False)
    spec = {"arch": "user_models:cifar_resnet", "img_size": 32}
    rep = convert(tmp_path, ckpt, spec, m, (3, 32, 32))
    conv = rep["source"]["base"]["conversion"]
    assert list(conv["blocks"]) == ["layer1.0"]  # the empty-Sequential identity shortcut maps
    assert len(conv["unmapped"]) == 1 and conv["unmapped"][0].startswith("layer1.1 (part shortcut (PadShortcut)")
    with pytest.raises(InputError, match=r"blocks layer1\.1 \(part shortcut \(PadShortcut\).*could not be mapped"):
        convert(tmp_path, ckpt, spec, m, (3, 32, 32), passes=[{"tie_rowcol": {}}], name="tied",
                calibration={"data": "random"})


def test_verify_ok_and_tampered(tmp_path):
    m = tiny_vit()
    ckpt = tmp_path / "w.safetensors"
    save_file(m.state_dict(), str(ckpt))
    args = {k: v for k, v in tiny_vit_args().items() if k not in ("num_classes", "img_size")}
    spec = {"arch": "timm:vit_tiny_patch16_224", "num_classes": 5, "img_size": 16, "kwargs": args}
    rep = convert(tmp_path, ckpt, spec, m, (3, 16, 16), passes=[{"vo": {"mode": "fold", "allow_growth": True}}])  # exact
    out = tmp_path / "out"
    assert len(rep["artifacts"]["onnx"]["sha256"]) == 64 and json.loads((out / "report.json").read_text())["artifacts"]
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and ok.output.startswith("ok: 2 files match their sha256; model.onnx matches")
    # the weights changed and the report was edited to match: the hashes pass, the ONNX comparison does not
    from safetensors import safe_open
    from safetensors.torch import load_file

    from compress.run.outdir import sha256

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(out / "model.safetensors"))
    sd["head.weight"] = sd["head.weight"] * 1.5
    save_file(sd, str(out / "model.safetensors"), metadata=meta)
    record = json.loads((out / "report.json").read_text())
    record["artifacts"]["safetensors"]["sha256"] = sha256(out / "model.safetensors")
    (out / "report.json").write_text(json.dumps(record))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 3 and "model.onnx and model.safetensors (rebuilt by load_compressed) differ" in bad.output
    with open(out / "model.onnx", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 3 and "model.onnx changed (sha256 differs from the report)" in bad.output
    assert runner.invoke(app, ["verify", str(tmp_path)]).exit_code == 2  # not a result directory


def test_absurd_sizes_fail_in_one_line(tmp_path):
    with pytest.raises(InputError, match="img_size: Input should be less than or equal to 4096"):
        parse_recipe({"version": 1, "model": {"arch": "timm:resnet18", "img_size": 100000}})
    with pytest.raises(InputError, match="input side 10000 is beyond 4096"):
        parse_recipe({"version": 1, "model": {"arch": "x:y", "preprocess": {"input_size": [3, 10000, 10000]}}})
    with pytest.raises(InputError, match="would need about .* GiB for activations at input 4096x4096 .* lower the input size"):
        check_memory(user_models.resnet(), (3, 4096, 4096), calib_images=64, train_batch=None)
    assert check_memory(user_models.resnet(), (3, 32, 32), calib_images=16, train_batch=8)["estimate_gib"] < 1


def test_stripped_prefix_is_put_back_when_the_model_has_it(tmp_path):
    from compress.load.sources.common import fit

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = user_models.resnet()

        def forward(self, x):
            return self.model(x)

    w = jitter(Wrapper())
    ckpt = tmp_path / "w.bin"
    torch.save(w.state_dict(), ckpt)
    sd, info = checkpoint.read(ckpt)
    assert info["repairs"][0].startswith("key prefix 'model.' removed") and not any(k.startswith("model.") for k in sd)
    fresh = Wrapper().eval()
    fit(fresh, sd, "Wrapper", ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), w(x))


def test_bare_weights_without_preprocess_say_what_was_assumed(tmp_path):
    """Bare weights record no mean/std: the run says what it assumed and how to set it (silently 0.5 cost the
    shared ViT 30 points of top-1); once model.preprocess gives mean and std, nothing is said."""
    from conftest import run_cli, write_recipe

    ckpt = tmp_path / "w.safetensors"
    save_file(tiny_vit().state_dict(), str(ckpt))
    args = {k: v for k, v in tiny_vit_args().items() if k not in ("num_classes", "img_size")}
    model = f"model: {{arch: timm:vit_tiny_patch16_224, num_classes: 5, img_size: 16, kwargs: {json.dumps(args)}"
    tail = "passes: []\nexport: {formats: [safetensors]}\nreport: {latency: null}\n"
    res = run_cli("apply", write_recipe(tmp_path / "a.yaml", f"version: 1\n{model}}}\n{tail}"), ckpt, "-o", tmp_path / "a")
    assert res.returncode == 0, res.stderr
    warned = [line for line in res.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and warned[0].startswith("warning: w.safetensors records no preprocessing: assumed "), res.stdout
    assert "mean [0.5, 0.5, 0.5], std [0.5, 0.5, 0.5]" in warned[0] and "set model.preprocess" in warned[0]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["source"]["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    told = f"version: 1\n{model}, preprocess: {{mean: [0.4, 0.4, 0.4], std: [0.2, 0.2, 0.2]}}}}\n{tail}"
    res = run_cli("apply", write_recipe(tmp_path / "b.yaml", told), ckpt, "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    assert "warning:" not in res.stdout and "records no preprocessing" not in res.stdout + res.stderr
