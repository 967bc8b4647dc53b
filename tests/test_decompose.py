"""Export of operators the TorchScript ONNX exporter lacks: written out (RMSNorm), else refused in one line."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from compress.core.errors import InputError
from compress.export import runtimes
from compress.export.decompose import written_out
from compress.export.write import to_onnx
from tests.conftest import save_timm_dir
from tests.test_sources import check_result, jitter, run

XP = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 5}


def test_rms_norm_written_out_matches_and_is_put_back():
    m = jitter(timm.create_model("vit_base_patch16_xp_224", pretrained=False, **XP))
    m.blocks[0].norm1 = nn.RMSNorm(16, eps=None)  # torch's own, eps from the dtype
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = m(x)
        with written_out(m) as names:
            got = m(x)
            assert "blocks.0.norm1" in names and len(names) >= 3
            assert not any(isinstance(k, nn.RMSNorm) for k in m.modules())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert isinstance(m.blocks[0].norm1, nn.RMSNorm)


@pytest.mark.parametrize("kind", ["timm_xp", "torch_rmsnorm"])
def test_rms_norm_models_export_with_parity(tmp_path, kind):
    """Before: exit 1 with 'aten::rms_norm ... is not supported' even for export-only."""
    if kind == "timm_xp":
        m = jitter(timm.create_model("vit_base_patch16_xp_224", pretrained=False, **XP))
        ckpt, spec = save_timm_dir(m, "vit_base_patch16_xp_224", XP, tmp_path / "xp"), None
    else:
        import user_models

        m = jitter(user_models.rms_mixer())
        ckpt, spec = tmp_path / "w.safetensors", {"arch": "user_models:rms_mixer", "img_size": 16}
        save_file(m.state_dict(), str(ckpt))
    out, rep = run(tmp_path, ckpt, [], model=spec)
    check_result(out, rep, (3, 16, 16))
    ran = {r["onnxruntime"]: r for r in rep["artifacts"]["onnx"]["runtimes"]}
    assert ran[runtimes.RUNTIMES["1.16"].release]["rel_diff"] <= 1e-4  # the oldest runtime the project promises


def test_operator_without_onnx_form_is_refused_in_one_line(tmp_path):
    class Odd(nn.Module):
        def forward(self, x):
            return torch.special.zeta(x.abs() + 2, torch.tensor(1.5)).flatten(1)

    with pytest.raises(InputError, match=r"operator aten::special_zeta at opset 18.*export.formats"):
        to_onnx(Odd(), tmp_path / "m.onnx", (1, 2, 2), opset=18, dynamic_batch=True)
