"""Third-party model code, copied unchanged (MIT, see LICENSE.*), to test compress on networks it was not built
around. vit-pytorch: github.com/lucidrains/vit-pytorch at 69d24fe (2026-06-13): vit.py, simple_vit.py and
vit_with_keel_post_ln.py (a post-LayerNorm ViT). Factories below size them for tests (32 px, 2 blocks)."""
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
