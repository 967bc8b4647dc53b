"""Third-party model code, copied unchanged (MIT, see LICENSE.*), to test compress on networks it was not built
around. vit-pytorch: github.com/lucidrains/vit-pytorch at 69d24fe (2026-06-13): vit.py, simple_vit.py and
vit_with_keel_post_ln.py (a post-LayerNorm ViT); efficient.py (vitp_efficient.py: a ViT that takes any encoder, here
torch's own nn.TransformerEncoder of nn.TransformerEncoderLayer, pre- and post-LayerNorm) and
simple_vit_with_value_residual.py (vitp_simple_vit_value_residual.py: its attention returns a tuple (out, values) and
later layers mix the first layer's values into their own). No file needed an edit. Factories below size them for tests
(32 px, 2 blocks)."""
from __future__ import annotations


def lucidrains_vit(num_classes: int = 10):
    from .vitp_vit import ViT

    return ViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, depth=2, heads=2, mlp_dim=64, dim_head=16)


def lucidrains_simple_vit(num_classes: int = 10):
    from .vitp_simple_vit import SimpleViT

    return SimpleViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, depth=2, heads=2, mlp_dim=64,
                     dim_head=16)


def lucidrains_post_ln_vit(num_classes: int = 10):
    from .vitp_keel_post_ln import ViT

    return ViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, depth=2, heads=2, mlp_dim=64, dim_head=16)


def _torch_encoder(norm_first: bool, activation: str):
    from torch import nn

    layer = nn.TransformerEncoderLayer(d_model=32, nhead=2, dim_feedforward=64, dropout=0.0, activation=activation,
                                       batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


def torch_encoder_vit(num_classes: int = 10):
    """vit-pytorch's efficient.py ViT around torch's nn.TransformerEncoder: pre-LayerNorm layers, GELU."""
    from .vitp_efficient import ViT

    return ViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, transformer=_torch_encoder(True, "gelu"))


def torch_encoder_post_ln_vit(num_classes: int = 10):
    """The same around torch's default nn.TransformerEncoderLayer: post-LayerNorm, ReLU."""
    from .vitp_efficient import ViT

    return ViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, transformer=_torch_encoder(False, "relu"))


def lucidrains_value_residual_vit(num_classes: int = 10):
    from .vitp_simple_vit_value_residual import SimpleViT

    return SimpleViT(image_size=32, patch_size=8, num_classes=num_classes, dim=32, depth=2, heads=2, mlp_dim=64,
                     dim_head=16)
