"""Modules that use one weight matrix in both directions (tie_rowcol), written so ONNX stores it once.

No forward transposes a weight: the exporter would constant-fold Transpose(W) into a second
initializer. Linear: Gemm(transB=1) reads W as stored, MatMul(h, W) is W^T applied to rows;
conv: Conv(x, W) and ConvTranspose(a, W) read the same (m, C, k, k) tensor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TiedMLP(nn.Module):
    """FFN(x) = W^T (s * act(W x + b1)) + b2 with one W (m x d); s is None when folded or not fitted."""

    ties_weights = True  # tells the ONNX writer to refuse graph rewrites that would store W twice

    def __init__(self, weight: torch.Tensor, b1: torch.Tensor | None, b2: torch.Tensor | None, act: nn.Module,
                 scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.b1 = nn.Parameter(b1) if b1 is not None else None
        self.b2 = nn.Parameter(b2) if b2 is not None else None
        self.scale = nn.Parameter(scale) if scale is not None else None
        self.act = act

    def forward(self, x):
        lead = x.shape[:-1]
        h = self.act(F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.b1))  # 2-D: one Gemm, transB=1
        if self.scale is not None:
            h = h * self.scale
        out = h @ self.weight
        if self.b2 is not None:
            out = out + self.b2
        return out.reshape(*lead, out.shape[-1])


class TiedConv(nn.Module):
    """A bias-free stride-1 conv with a weight W (m, C, k, k) that may be shared.

    transpose False: Conv with W, C -> m channels; True: ConvTranspose with W, m -> C channels
    (the channel transpose of W with flipped kernels; for 1x1 kernels exactly W^T).
    The owner registers W; other users hold it unregistered, so it is saved and counted once.
    """

    ties_weights = True  # tells the ONNX writer not to fold BatchNorm into (and so duplicate) W

    def __init__(self, weight: nn.Parameter, padding: int, transpose: bool, owner: bool):
        super().__init__()
        self.padding, self.transpose, self.owner = padding, transpose, owner
        if owner:
            self.weight = weight
        else:
            self._shared = (weight,)  # a tuple is not registered: state_dict and parameters() skip it

    def shared_weight(self) -> nn.Parameter:
        return self.weight if self.owner else self._shared[0]

    def forward(self, x):
        w = self.shared_weight()
        if self.transpose:
            return F.conv_transpose2d(x, w, padding=self.padding)
        return F.conv2d(x, w, padding=self.padding)

    def extra_repr(self) -> str:
        w = self.shared_weight()
        return f"{tuple(w.shape)}, padding={self.padding}, transpose={self.transpose}, owner={self.owner}"
