"""Tiny CNNs, one channel coupling each, for width's traced channel graph (tests/test_width_graph.py).

`coupled(kind)`: a stem, one block of the named coupling, a classifier on average pooling; `coupled("all")` chains
every block but the fixed-size split. Loaded as `model.arch: graph_models:coupled` through `module:factory`.
"""
from __future__ import annotations

import torch
from torch import nn

C = 16


def _cbr(i, o, k=3, groups=1, norm=None):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), norm or nn.BatchNorm2d(o), nn.ReLU())


class Residual(nn.Module):
    """Two basic blocks on one stream: the stem, both blocks' second convs and the head share its channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(_cbr(C, C), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))
        self.b = nn.Sequential(_cbr(C, C), nn.Conv2d(C, C, 3, padding=1, bias=False), nn.BatchNorm2d(C))

    def forward(self, x):
        x = torch.relu(x + self.a(x))
        return torch.relu(x + self.b(x))


class Concat(nn.Module):
    """DenseNet-style: each layer's output is concatenated to its input."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = _cbr(C, C), _cbr(2 * C, C)
        self.out = _cbr(3 * C, C, 1)

    def forward(self, x):
        x = torch.cat([x, self.l1(x)], 1)
        x = torch.cat([x, self.l2(x)], 1)
        return self.out(x)


class Split(nn.Module):
    """One conv's channels split in halves (chunk: the halves follow the width), each half its own branch,
    concatenated back."""

    def __init__(self):
        super().__init__()
        self.wide = _cbr(C, 2 * C, 1)
        self.left, self.right = _cbr(C, C), _cbr(C, C)
        self.out = _cbr(2 * C, C, 1)

    def forward(self, x):
        a, b = self.wide(x).chunk(2, dim=1)
        return self.out(torch.cat([self.left(a), self.right(b)], 1))


class Grouped(nn.Module):
    """ResNeXt-style grouped 3x3 between two 1x1s: 4 groups (whole groups go), or 2 (each keeps fewer channels)."""

    def __init__(self, groups: int = 4):
        super().__init__()
        self.seq = nn.Sequential(_cbr(C, 2 * C, 1), _cbr(2 * C, 2 * C, 3, groups=groups), _cbr(2 * C, C, 1))

    def forward(self, x):
        return self.seq(x)


class Depthwise(nn.Module):
    """MobileNetV2's inverted residual: expand, depthwise 3x3, project, add."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(_cbr(C, 4 * C, 1), _cbr(4 * C, 4 * C, 3, groups=4 * C),
                                 nn.Conv2d(4 * C, C, 1, bias=False), nn.BatchNorm2d(C))

    def forward(self, x):
        return x + self.seq(x)


class GroupNormed(nn.Module):
    """GroupNorm's statistics span groups of channels: they go whole."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(_cbr(C, 2 * C, 3, norm=nn.GroupNorm(4, 2 * C)), _cbr(2 * C, C, 3, norm=nn.GroupNorm(4, C)))

    def forward(self, x):
        return self.seq(x)


class SE(nn.Module):
    """Squeeze-excitation: a gate from pooled channels multiplies the channels it was computed from."""

    def __init__(self):
        super().__init__()
        self.conv = _cbr(C, 2 * C)
        self.fc1, self.fc2 = nn.Conv2d(2 * C, 8, 1), nn.Conv2d(8, 2 * C, 1)
        self.out = _cbr(2 * C, C, 1)

    def forward(self, x):
        x = self.conv(x)
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * g)


class FixedSplit(Split):
    """The same split written with a fixed size (Res2Net-style): the halves cannot narrow, the rest can."""

    def forward(self, x):
        a, b = torch.split(self.wide(x), C, dim=1)
        return self.out(torch.cat([self.left(a), self.right(b)], 1))


BLOCKS = {"residual": Residual, "concat": Concat, "split": Split, "grouped": Grouped,
          "grouped_few": lambda: Grouped(2), "depthwise": Depthwise,
          "groupnorm": GroupNormed, "se": SE,
          "fixed_split": FixedSplit}


class Coupled(nn.Module):
    def __init__(self, kind: str = "all", num_classes: int = 10):
        super().__init__()
        self.stem = _cbr(3, C)
        kinds = [k for k in BLOCKS if k != "fixed_split"] if kind == "all" else [kind]  # fixed_split: a retry, alone
        self.blocks = nn.Sequential(*[BLOCKS[k]() for k in kinds])
        self.fc = nn.Linear(C, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class _Reverse(torch.autograd.Function):
    """Reverses the channel order: a Python autograd Function, opaque to any autograd trace."""

    @staticmethod
    def forward(ctx, x):
        return x.flip(1)

    @staticmethod
    def backward(ctx, g):
        return g.flip(1)


class Untraceable(nn.Module):
    """Every conv's channels pass through a custom autograd Function: no channel group can be traced through it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.a, self.b = _cbr(3, C), _cbr(C, C)
        self.fc = nn.Linear(C, num_classes)

    def forward(self, x):
        x = self.b(_Reverse.apply(self.a(x)))
        return self.fc(_Reverse.apply(x).mean((2, 3)))


def coupled(kind: str = "all", num_classes: int = 10) -> nn.Module:
    return Coupled(kind, num_classes)
