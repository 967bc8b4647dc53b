"""FLOPs are counted on the meta device (no arithmetic); torch's flop counter on real tensors is the reference."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from compress.adapters import detect
from compress.measure.metrics import _count_flops, count_flops
from compress.passes.lowrank import LowRankConfig, lowrank
from compress.core.registry import PassContext
from tests.conftest import tiny_vit


def _models():
    vit = tiny_vit()
    converted = copy.deepcopy(vit)
    detect(converted).layers(converted)  # the adapter's own attention modules
    factorised = copy.deepcopy(vit)
    lowrank(factorised, detect(factorised), LowRankConfig(rank=8), PassContext(torch.randn(4, 3, 16, 16)))
    torch.manual_seed(0)
    return [(vit, (3, 16, 16)), (converted, (3, 16, 16)), (factorised, (3, 16, 16)),
            (timm.create_model("resnet18", num_classes=10).eval(), (3, 32, 32))]


@pytest.mark.parametrize("index", range(4))
def test_meta_count_equals_the_real_flop_counter(index):
    model, size = _models()[index]
    real = _count_flops(model, size, meta=False)
    assert real > 0 and _count_flops(model, size, meta=True) == real == count_flops(model, size)


class PlainTensor(nn.Module):
    """Holds a tensor that is neither parameter nor buffer: meta tensors cannot stand in for it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = torch.ones(3)

    def forward(self, x):
        return self.lin(x.flatten(1)[:, :4]) * self.scale


def test_a_model_meta_cannot_run_is_counted_for_real():
    m = PlainTensor()
    with pytest.raises(Exception):
        _count_flops(m, (1, 2, 2), meta=True)
    assert count_flops(m, (1, 2, 2)) == _count_flops(m, (1, 2, 2), meta=False) == 2 * 4 * 3
