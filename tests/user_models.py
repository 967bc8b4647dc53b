"""Tiny architectures written the way users write their own, loaded by `model.arch: user_models:FACTORY`."""
from __future__ import annotations

import torch
from torch import nn


class SelfAttention(nn.Module):
    """Fused qkv, no head-count attribute: the loader finds the head count numerically."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self._h = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self._h, d // self._h).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self._h) ** -0.5).softmax(-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, post_norm: bool = False, mha: bool = False):
        super().__init__()
        self.post_norm, self.mha = post_norm, mha
        self.ln_a = nn.LayerNorm(dim)
        self.mix = nn.MultiheadAttention(dim, heads, batch_first=True) if mha else SelfAttention(dim, heads)
        self.ln_b = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))

    def _mix(self, x):
        return self.mix(x, x, x, need_weights=False)[0] if self.mha else self.mix(x)

    def forward(self, x):
        if self.post_norm:  # not a pre-norm block: it cannot be mapped, and the loader must say so
            x = self.ln_a(x + self._mix(x))
            return self.ln_b(x + self.ffn(x))
        x = x + self._mix(self.ln_a(x))
        return x + self.ffn(self.ln_b(x))


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 5, dim: int = 16, depth: int = 3, heads: int = 2, post_norm_block: int = -1):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, 5, dim))  # 16x16 images: 4 patches + class token
        self.layers = nn.ModuleList(Block(dim, heads, post_norm=i == post_norm_block, mha=i == 1) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for blk in self.layers:
            x = blk(x)
        return self.classifier(self.norm(x)[:, 0])


class Residual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(cout)
        self.b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b_bn = nn.BatchNorm2d(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.b_bn(self.b(torch.relu(self.a_bn(self.a(x)))))
        return torch.relu(y + (self.skip(x) if self.skip is not None else x))


class TinyResNet(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(Residual(width, width, 1), Residual(width, 2 * width, 2), Residual(2 * width, 2 * width, 1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(self.stem(x)).mean((2, 3)))

    @classmethod
    def from_name(cls, name: str, num_classes: int = 5):
        """A class's own factory, as EfficientNet-PyTorch's `EfficientNet.from_name('efficientnet-lite1')`."""
        return cls(num_classes, width={"tiny": 8, "small": 16}[name])


def vit(num_classes: int = 5, post_norm_block: int = -1) -> nn.Module:
    return TinyViT(num_classes, post_norm_block=post_norm_block)


def resnet(num_classes: int = 5) -> nn.Module:
    return TinyResNet(num_classes)


def not_a_model():
    return {"weights": 1}


class BatchReadingViT(TinyViT):
    """A forward that reads the batch size as a Python int, as hand-written models do: a trace bakes it in."""

    def __init__(self, num_classes: int = 5, as_int: bool = False):
        super().__init__(num_classes)
        self.as_int = as_int

    def forward(self, x):
        b = int(x.shape[0]) if self.as_int else len(x)
        x = self.patch(x).reshape(b, self.pos.shape[-1], -1).transpose(1, 2)
        x = torch.cat([self.cls.expand(b, -1, -1), x], 1) + self.pos
        for blk in self.layers:
            x = blk(x)
        return self.classifier(self.norm(x)[:, 0].reshape(b, -1))


def vit_len(num_classes: int = 5, as_int: bool = False) -> nn.Module:
    return BatchReadingViT(num_classes, as_int)


class PadShortcut(nn.Module):
    """The CIFAR ResNet paper's option A: subsample and zero-pad channels; no parameters."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class CifarBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = PadShortcut(cout) if stride != 1 or cin != cout else nn.Sequential()

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + self.shortcut(x))


class CifarResNet(nn.Module):
    """Blocks with an empty-Sequential identity shortcut, and one downsampling block with a parameter-free shortcut."""

    def __init__(self, num_classes: int = 5, in_chans: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(CifarBlock(width, width, 1), CifarBlock(width, 2 * width, 2))
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer1(torch.relu(self.bn1(self.conv1(x))))
        return self.linear(x.mean((2, 3)))


class SmallCNN(nn.Module):
    """No residual or transformer blocks at all (a 1-channel 28x28 digit classifier)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_chans, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def cifar_resnet(num_classes: int = 5, in_chans: int = 3) -> nn.Module:
    return CifarResNet(num_classes, in_chans)


def small_cnn(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return SmallCNN(num_classes, in_chans)


class TorchViT(nn.Module):
    """A ViT built from torch's own nn.TransformerEncoder (fast path, raw in_proj_weight): rebuilt at load."""

    def __init__(self, num_classes: int = 5, dim: int = 16, depth: int = 2, heads: int = 2, norm_first: bool = True,
                 batch_first: bool = True, activation: str = "gelu"):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 4, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.encoder(x if self.batch_first else x.transpose(0, 1))
        return self.head(x.mean(1 if self.batch_first else 0))


def torch_vit(num_classes: int = 5, **kw) -> nn.Module:
    return TorchViT(num_classes, **kw)


class TupleBlock(nn.Module):
    """Returns (tokens, attention weights), as many third-party ViTs do: no neutral form, but plain Linears."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        a, w = self.attn(self.norm1(x), self.norm1(x), self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x)), w


class TupleViT(nn.Module):
    def __init__(self, num_classes: int = 5, dim: int = 16, depth: int = 2, heads: int = 2):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 4, dim))
        self.blocks = nn.ModuleList(TupleBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x, _ = blk(x)
        return self.head(x.mean(1))


def tuple_vit(num_classes: int = 5) -> nn.Module:
    return TupleViT(num_classes)


class RmsMixer(nn.Module):
    """torch's nn.RMSNorm (aten::rms_norm has no ONNX export at opset 18): written out for the export."""

    def __init__(self, num_classes: int = 5, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, 8)
        self.norm = nn.RMSNorm(dim)
        self.fc = nn.Linear(dim, dim)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6, elementwise_affine=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = x + self.fc(self.norm(x))
        return self.head(self.norm2(x).mean(1))


def rms_mixer(num_classes: int = 5) -> nn.Module:
    return RmsMixer(num_classes)


class ColourProbe(nn.Module):
    """1000 outputs; a red, green or blue image scores highest at output 1, 2 or 3 (ImageNet wnid label tests)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def colour_probe(num_classes: int = 1000) -> nn.Module:
    m = ColourProbe(num_classes)
    with torch.no_grad():
        m.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        m.conv.bias.zero_()
        m.head.weight.zero_()
        m.head.weight[1:4] = torch.eye(3)
        m.head.bias.fill_(-100.0)
        m.head.bias[1:4] = 0.0
    return m
