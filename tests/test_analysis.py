"""compress analyze and mlp_strip auto: a dead MLP ranks last, the coding rate's N x N form is right."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from compress.adapters import detect
from compress.measure.analysis import analyze, coding_rate
from compress.run.analyze import run
from compress.core.probe import greedy_mlp_skip
from compress.core.errors import InputError
from compress.core.locks import try_lock, unlock
from compress.run.outdir import lock_path
from compress.passes.mlp_strip import MLPStripConfig, mlp_strip
from compress.core.registry import PassContext
from tests.conftest import make_image_zip, run_cli, save_timm_dir, tiny_vit, tiny_vit_args

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))


def _dead_mlp_vit(block: int = 2):
    """A 4-block tiny ViT whose block `block` MLP outputs exactly zero."""
    m = tiny_vit(depth=4)
    with torch.no_grad():
        m.blocks[block].mlp.fc2.weight.zero_()
        m.blocks[block].mlp.fc2.bias.zero_()
    return m


def test_analyze_ranks_a_zeroed_mlp_least_important():
    m = _dead_mlp_vit(2)
    res = analyze(m, detect(m), X)
    assert res["mlp_rank"][0] == 2 and res["greedy_mlp"][0]["block"] == 2
    row = res["blocks"][2]
    assert row["skip_kl_mlp"] == pytest.approx(0, abs=1e-9) and row["influence_mlp"] == pytest.approx(0, abs=1e-9)
    assert all(r["skip_kl_mlp"] > 1e-6 for r in res["blocks"] if r["block"] != 2)
    assert [r["block"] for r in res["blocks"]] == [0, 1, 2, 3] and res["blocks"][0]["attn_cos_prev"] is None


def test_mlp_strip_auto_removes_the_dead_mlp_and_keeps_the_function():
    m = _dead_mlp_vit(1)
    out = mlp_strip(copy.deepcopy(m), detect(m), MLPStripConfig(blocks="auto", fraction=0.25), PassContext(X))
    assert out.details["blocks"] == [1] and out.details["scores"][0]["block"] == 1
    assert out.model.blocks[1].mlp is None and all(out.model.blocks[i].mlp is not None for i in (0, 2, 3))
    with torch.no_grad():
        torch.testing.assert_close(out.model(X), m(X))
    replayed = mlp_strip(tiny_vit(depth=4), detect(m), MLPStripConfig(blocks="auto", fraction=0.25),
                         PassContext(None, replay={"blocks": [3]})).model
    assert [i for i, b in enumerate(replayed.blocks) if b.mlp is None] == [3]  # replay rebuilds, never re-ranks
    with pytest.raises(InputError, match="calibration"):
        mlp_strip(tiny_vit(depth=4), detect(m), MLPStripConfig(blocks="auto", fraction=0.25), PassContext(None))
    with pytest.raises(ValueError, match="fraction is required"):
        MLPStripConfig(blocks="auto")


def test_coding_rate_gram_form_equals_the_d_by_d_form():
    z = torch.randn(3, 10, 24, dtype=torch.float64)
    zn = torch.nn.functional.normalize(z, dim=-1)
    eps, n, d = 0.5, 10, 24
    direct = 0.5 * torch.logdet(torch.eye(d, dtype=torch.float64) + d / (n * eps ** 2) * zn.transpose(1, 2) @ zn).mean()
    assert coding_rate(z, eps) == pytest.approx(float(direct), rel=1e-10)


def test_analyze_cli_writes_json_and_chart(tmp_path):
    image_zip = make_image_zip(tmp_path / "images.zip", corrupt=0)
    vit = save_timm_dir(_dead_mlp_vit(1), "vit_tiny_patch16_224", tiny_vit_args(depth=4), tmp_path / "vit")
    out = tmp_path / "an"
    res = run_cli("analyze", vit, "--data", image_zip, "--images", 16, "--eps", 0.3, "-o", out)
    assert res.returncode == 0, res.stderr
    data = json.loads((out / "analysis.json").read_text())
    assert data["eps"] == 0.3 and data["images"] == 16 and data["mlp_rank"][0] == 1
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG" and not list(out.glob("*.tmp"))
    assert "skipKL mlp" in res.stdout and "greedy removal order: 1" in res.stdout
    with pytest.raises(InputError, match="--eps 0"):
        run(str(vit), None, 16, 0.0, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.glob(".an.lock"))  # the lock went with the run

    held = try_lock(lock_path(out))  # another run writing the same folder: refused, its files untouched
    before = (out / "analysis.json").read_bytes()
    try:
        with pytest.raises(InputError, match="being written by another compress run"):
            run(str(vit), None, 16, 0.5, out)
    finally:
        unlock(held, lock_path(out))
    assert (out / "analysis.json").read_bytes() == before


@pytest.mark.slow
def test_greedy_choice_on_the_teacher_costs_no_more_kl_than_first_or_last():
    """On the real teacher, the auto choice's skip-KL is at most that of stripping the first or last blocks."""
    from compress.load.data import calibration_batch
    from compress.load.model import load
    from compress.core.probe import kl, zeroed
    from tests.conftest import CIFAR_TRAIN, VIT_TEACHER, need_shared

    loaded = load(str(need_shared(VIT_TEACHER)))
    x, _ = calibration_batch(need_shared(CIFAR_TRAIN), loaded.data_cfg, 32, 0)
    m, adapter = loaded.model, loaded.adapter
    chosen = greedy_mlp_skip(m, adapter, x, 3)
    blocks = adapter.vit_blocks(m)
    with torch.no_grad():
        ref = m(x)

    def cost(idx):
        with zeroed([blocks[i].ls2 for i in idx]), torch.no_grad():
            return kl(ref, m(x))

    assert cost([c["block"] for c in chosen]) == pytest.approx(chosen[-1]["kl"], abs=1e-6)  # recorded to 6 decimals
    assert chosen[-1]["kl"] <= min(cost([0, 1, 2]), cost([3, 4, 5]))
