"""Export-time q/k/v fusion: one MatMul per block in the file, the same outputs, the model given back unchanged."""
from __future__ import annotations

import onnx
import pytest
import torch

from compress.adapters import detect
from compress.export.write import write_onnx
from compress.export.fuse import FusedQKVAttention, fused_qkv
from compress.core.modules import SeparateQK
from tests.conftest import tiny_vit


@pytest.mark.parametrize("narrow_v", [False, True])
def test_fused_export_has_one_qkv_matmul_per_block_and_the_same_outputs(tmp_path, narrow_v):
    model = tiny_vit(heads=2, depth=2)
    blocks = detect(model).vit_blocks(model)  # timm blocks -> separate q, k, v (what passes rewrite)
    if narrow_v:  # v narrower than q/k (width cuts them apart): the split form instead of timm's 5-D reshape
        for b in blocks:
            v, proj = b.attn.value.v, b.attn.value.proj
            b.attn.value.v = torch.nn.Linear(v.in_features, v.out_features // 2)
            b.attn.value.proj = torch.nn.Linear(v.out_features // 2, proj.out_features)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with fused_qkv(model):
            assert all(isinstance(b.attn, FusedQKVAttention) for b in blocks)
            assert torch.allclose(model(x), ref, atol=1e-5)
    assert all(isinstance(b.attn.score, SeparateQK) for b in blocks)  # given back
    path = tmp_path / "m.onnx"
    info = write_onnx(model, path, x, opset=17, dynamic_batch=True, tol=1e-4, slim=True)  # raises on a parity miss
    assert info["parity"]["rel_diff"] <= 1e-4
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 6 * len(blocks)  # qkv, q.k, attn.v, proj, fc1, fc2 (the head is a Gemm)
