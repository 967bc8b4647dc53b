"""Hand-written models in the styles of public repositories (tutorials, CIFAR repos, vit-pytorch-like code), tiny.

Each factory is loaded as `model.arch: zoo_models:NAME` (see tests/test_zoo_styles.py). These are our own small
versions of common ways to write a ViT or a ResNet, not copies: the point is the *style* (names, where the
shortcut is computed, what forward returns), which the loader has to take as it comes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DIM, HEADS, DEPTH, PATCH, SIDE = 16, 2, 2, 8, 32
TOKENS = (SIDE // PATCH) ** 2


# ----------------------------------------------------------------------------- ViT parts

class PerHeadAttention(nn.Module):
    """One q/k/v Linear triple per head in a ModuleList, concatenated, then a projection (tutorial style)."""

    class Head(nn.Module):
        def __init__(self, dim: int, hd: int):
            super().__init__()
            self.query, self.key, self.value = nn.Linear(dim, hd), nn.Linear(dim, hd), nn.Linear(dim, hd)

        def forward(self, x):
            a = (self.query(x) @ self.key(x).transpose(-2, -1) / math.sqrt(self.query.out_features)).softmax(-1)
            return a @ self.value(x)

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = nn.ModuleList(self.Head(dim, dim // heads) for _ in range(heads))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(torch.cat([h(x) for h in self.heads], -1))


class FusedAttention(nn.Module):
    """Fused in-projection under other names (qkv_proj / o_proj), head count as `n_head`; optionally returns the map."""

    def __init__(self, dim: int, heads: int, return_map: bool = False):
        super().__init__()
        self.n_head, self.return_map = heads, return_map
        self.qkv_proj, self.o_proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) * (d // self.n_head) ** -0.5).softmax(-1)
        y = self.o_proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return (y, a) if self.return_map else y


class SeparateQKV(nn.Module):
    """q, k, v, o Linears with a `head` count attribute (ViT-CIFAR style)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.head = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.head, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.head), -1)
        return self.o((a @ v).transpose(1, 2).reshape(b, n, d))


class HandGELU(nn.Module):
    """The tanh form of GELU written out, as older code did before nn.GELU existed."""

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


class Block(nn.Module):
    """Pre-norm (or post-norm) block around any attention; `returns_map` gives (x, attention map) as many repos do."""

    def __init__(self, attn: nn.Module, act: nn.Module, post_norm: bool = False, returns_map: bool = False):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(DIM), attn, nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), act, nn.Linear(2 * DIM, DIM))
        self.post_norm, self.returns_map = post_norm, returns_map

    def forward(self, x):
        if self.post_norm:
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        y = self.attn(self.norm1(x))
        y, amap = y if isinstance(y, tuple) else (y, None)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return (x, amap) if self.returns_map else x


class ViT(nn.Module):
    """Patch conv + class token + blocks + (optional) final norm + head; forward can return a tensor, tuple or dict."""

    def __init__(self, blocks: list[nn.Module], num_classes: int = 5, final_norm: bool = True, returns: str = "tensor"):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, TOKENS + 1, DIM) * 0.02)
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(DIM) if final_norm else nn.Identity()
        self.head = nn.Linear(DIM, num_classes)
        self.returns = returns

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
            x = x[0] if isinstance(x, tuple) else x
        feats = self.norm(x)[:, 0]
        logits = self.head(feats)
        if self.returns == "tuple":
            return logits, feats
        if self.returns == "dict":
            return {"logits": logits, "features": feats}
        return logits


def per_head_qkv(num_classes: int = 5) -> nn.Module:
    return ViT([Block(PerHeadAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes)


def fused_qkv_named(num_classes: int = 5) -> nn.Module:
    return ViT([Block(FusedAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes)


def tuple_blocks(num_classes: int = 5) -> nn.Module:
    """Blocks that return (x, attention map); the model keeps x."""
    return ViT([Block(FusedAttention(DIM, HEADS, return_map=True), nn.GELU(), returns_map=True) for _ in range(DEPTH)],
               num_classes)


def hand_gelu(num_classes: int = 5) -> nn.Module:
    return ViT([Block(SeparateQKV(DIM, HEADS), HandGELU()) for _ in range(DEPTH)], num_classes)


def no_final_norm(num_classes: int = 5) -> nn.Module:
    return ViT([Block(FusedAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes, final_norm=False)


def post_norm(num_classes: int = 5) -> nn.Module:
    return ViT([Block(SeparateQKV(DIM, HEADS), nn.GELU(), post_norm=True) for _ in range(DEPTH)], num_classes)


def tuple_output(num_classes: int = 5) -> nn.Module:
    """forward returns (logits, features)."""
    return ViT([Block(FusedAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes, returns="tuple")


def dict_output(num_classes: int = 5) -> nn.Module:
    """forward returns {'logits': ..., 'features': ...}."""
    return ViT([Block(SeparateQKV(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes, returns="dict")


class PartsCallingViT(ViT):
    """The model's forward calls each block's parts itself (block.forward is never called)."""

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = x + blk.attn(blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
        return self.head(self.norm(x)[:, 0])


class AttrReadingViT(ViT):
    """The model's forward reads an attribute of its blocks' attention (as attention-rollout code does)."""

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x) * (blk.attn.n_head / HEADS)
        return self.head(self.norm(x)[:, 0])


def parts_called(num_classes: int = 5) -> nn.Module:
    return PartsCallingViT([Block(FusedAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes)


def block_attr_read(num_classes: int = 5) -> nn.Module:
    return AttrReadingViT([Block(FusedAttention(DIM, HEADS), nn.GELU()) for _ in range(DEPTH)], num_classes)


class PreNorm(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(DIM), fn

    def forward(self, x):
        return self.fn(self.norm(x))


class PairListViT(nn.Module):
    """vit-pytorch-like: layers = ModuleList of [PreNorm(attention), PreNorm(feed-forward)] pairs, residuals in forward,
    mean pooling, no class token."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.to_patch = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos = nn.Parameter(torch.randn(1, TOKENS, DIM) * 0.02)
        ff = lambda: nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * DIM, DIM))  # noqa: E731
        self.layers = nn.ModuleList(nn.ModuleList([PreNorm(FusedAttention(DIM, HEADS)), PreNorm(ff())]) for _ in range(DEPTH))
        self.mlp_head = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, num_classes))

    def forward(self, x):
        x = self.to_patch(x).flatten(2).transpose(1, 2) + self.pos
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return self.mlp_head(x.mean(1))


def pair_list(num_classes: int = 5) -> nn.Module:
    return PairListViT(num_classes)


class TorchEncoderViT(nn.Module):
    """ViT on torch's own nn.TransformerEncoder (fused fast path in eval), in any of its layouts."""

    def __init__(self, num_classes: int = 5, batch_first: bool = True, norm_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, TOKENS + 1, DIM) * 0.02)
        layer = nn.TransformerEncoderLayer(DIM, HEADS, 2 * DIM, dropout=0.0, activation="gelu", batch_first=batch_first,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, DEPTH, norm=nn.LayerNorm(DIM) if norm_first else None,
                                             enable_nested_tensor=False)
        self.fc = nn.Linear(DIM, num_classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        return self.fc(x[:, 0] if self.batch_first else x[0])


def torch_encoder(num_classes: int = 5, batch_first: bool = True, norm_first: bool = True) -> nn.Module:
    return TorchEncoderViT(num_classes, batch_first, norm_first)


# ----------------------------------------------------------------------------- ResNet parts

def _shortcut(kind: str, cin: int, cout: int, stride: int):
    """The parameter-free shortcuts of CIFAR ResNets, computed in forward (a function, not a module)."""
    if stride == 1 and cin == cout or kind == "identity":
        return lambda x: x
    pad = (cout - cin) // 2
    if kind == "avgpool_pad":  # option A with pooling: average-pool, then zero channels on both sides
        return lambda x: F.pad(F.avg_pool2d(x, stride), (0, 0, 0, 0, pad, cout - cin - pad))
    if kind == "slice":  # option A: every other pixel, zero channels appended
        return lambda x: torch.cat([x[:, :, ::stride, ::stride], x.new_zeros(x.shape[0], cout - cin, *x[:, :, ::stride, ::stride].shape[2:])], 1)
    raise ValueError(kind)


class LambdaLayer(nn.Module):
    """A module around a function (akamaster-style resnet20 option A)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, conv_bias: bool = False, as_module: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(cout)
        self.kind = shortcut
        if shortcut == "conv" and (stride != 1 or cin != cout):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=conv_bias), nn.BatchNorm2d(cout))
        elif as_module:
            self.shortcut = LambdaLayer(_shortcut(shortcut, cin, cout, stride))
        else:
            self.skip = _shortcut("identity" if shortcut == "conv" else shortcut, cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (self.shortcut(x) if hasattr(self, "shortcut") else self.skip(x)))


class ResNet(nn.Module):
    def __init__(self, shortcut: str = "conv", num_classes: int = 5, conv_bias: bool = False, as_module: bool = False,
                 width: int = 8, flat: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=conv_bias)
        self.bn1 = nn.BatchNorm2d(width)
        blocks = [BasicBlock(width, width, 1, shortcut, conv_bias, as_module),
                  BasicBlock(width, 2 * width, 2, shortcut, conv_bias, as_module),
                  BasicBlock(2 * width, 2 * width, 1, shortcut, conv_bias, as_module)]
        if flat:  # every block in one flat Sequential, no stages
            self.features = nn.Sequential(*blocks)
        else:
            self.layer1, self.layer2 = nn.Sequential(blocks[0]), nn.Sequential(*blocks[1:])
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.features(x) if hasattr(self, "features") else self.layer2(self.layer1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def conv_bias_bn(num_classes: int = 5) -> nn.Module:
    """Convs with a bias before their BatchNorm (a redundant bias, common in hand-written code)."""
    return ResNet("conv", num_classes, conv_bias=True)


def identity_shortcut(num_classes: int = 5) -> nn.Module:
    """The identity shortcut computed in forward (no module for it) where shapes agree."""
    return ResNet("conv", num_classes)


def avgpool_pad_shortcut(num_classes: int = 5) -> nn.Module:
    return ResNet("avgpool_pad", num_classes)


def slice_shortcut(num_classes: int = 5) -> nn.Module:
    return ResNet("slice", num_classes)


def lambda_shortcut(num_classes: int = 5) -> nn.Module:
    return ResNet("slice", num_classes, as_module=True)


def flat_blocks(num_classes: int = 5) -> nn.Module:
    return ResNet("conv", num_classes, flat=True)


class PreActBlock(nn.Module):
    """BN-ReLU-conv order (pre-activation), 1x1 conv shortcut without BN."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    def __init__(self, num_classes: int = 5, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.layers = nn.Sequential(PreActBlock(width, width, 1), PreActBlock(width, 2 * width, 2))
        self.bn = nn.BatchNorm2d(2 * width)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(F.avg_pool2d(x, x.shape[-1]).flatten(1))


def preact(num_classes: int = 5) -> nn.Module:
    return PreActResNet(num_classes)
