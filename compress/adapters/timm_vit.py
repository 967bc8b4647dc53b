"""timm VisionTransformer (and subclasses such as DeiT distilled) -> neutral ViT blocks."""
from __future__ import annotations

from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..core.errors import InputError
from ..core.modules import Attention, SeparateQK, SeparateVO, ViTBlock


def _split_linear(src: nn.Linear, start: int, stop: int) -> nn.Linear:
    out = nn.Linear(src.in_features, stop - start, bias=src.bias is not None)
    out.weight.data.copy_(src.weight.data[start:stop])
    if src.bias is not None:
        out.bias.data.copy_(src.bias.data[start:stop])
    return out


def _convert_attention(a: TimmAttention, where: str) -> Attention:
    unsupported = [n for n, m in (("qk_norm", a.q_norm), ("scale_norm", a.norm)) if not isinstance(m, nn.Identity)]
    if getattr(a, "gate", None) is not None:
        unsupported.append("gated")
    if unsupported:
        raise InputError(f"{where}: timm attention with {', '.join(unsupported)} is not supported by the passes yet; "
                         "use a recipe without attention passes for this model")
    n = a.attn_dim
    q, k, v = (_split_linear(a.qkv, i * n, (i + 1) * n) for i in range(3))
    return Attention(SeparateQK(q, k, a.num_heads), SeparateVO(v, a.proj, a.num_heads), a.attn_drop, a.proj_drop)


def _plain_layer(model: nn.Module, name: str) -> bool:
    """True when `name` is still an untouched nn.Linear / nn.Conv2d (not merged, stripped or factorised)."""
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return False
    return type(m) in (nn.Linear, nn.Conv2d)


def _standard(blk: nn.Module) -> bool:
    return isinstance(blk, ViTBlock) or (type(blk) is TimmBlock and type(getattr(blk, "attn", None)) is TimmAttention)


class TimmViTAdapter:
    name = "timm-vit"
    family = "vit"

    def matches(self, model: nn.Module) -> bool:
        """A timm VisionTransformer whose blocks are all the standard pre-norm Block with standard Attention;
        other block types (parallel blocks, ...) fall to the generic adapter, so they still load and export."""
        return isinstance(model, VisionTransformer) and all(_standard(b) for b in model.blocks)

    def vit_blocks(self, model: VisionTransformer) -> list[ViTBlock]:
        for i, blk in enumerate(model.blocks):
            if isinstance(blk, ViTBlock):
                continue
            if not _standard(blk):
                raise InputError(f"blocks.{i}: timm block type {type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__} "
                                 "is not supported by the passes (only pre-norm Block with standard Attention)")
            model.blocks[i] = ViTBlock(blk.norm1, _convert_attention(blk.attn, f"blocks.{i}"), blk.ls1,
                                       blk.drop_path1, blk.norm2, blk.mlp, blk.ls2, blk.drop_path2)
        return list(model.blocks)

    def res_blocks(self, model):
        raise InputError("a ViT has no residual conv blocks")

    def layers(self, model: VisionTransformer) -> list[tuple[str, str]]:
        found = [("patch_embed.proj", "stem")]
        for i, blk in enumerate(self.vit_blocks(model)):
            parts = [("attn.score.q", "attn"), ("attn.score.k", "attn"), ("attn.value.v", "attn"),
                     ("attn.value.proj", "attn"), ("mlp.fc1", "mlp"), ("mlp.fc2", "mlp")]
            found += [(f"blocks.{i}.{p}", kind) for p, kind in parts]
        found.append(("head", "head"))
        return [(n, k) for n, k in found if _plain_layer(model, n)]

    def feature_modules(self, model: VisionTransformer) -> list[nn.Module]:
        return list(model.blocks)

    def input_size(self, model: VisionTransformer):
        h, w = model.patch_embed.img_size
        return (model.patch_embed.proj.in_channels, h, w)

    def describe(self, model: VisionTransformer) -> dict:
        b = model.blocks[0]
        heads = b.attn.num_heads if hasattr(b.attn, "num_heads") else b.attn.score.heads
        return {"blocks": len(model.blocks), "width": model.embed_dim, "heads": heads,
                "tokens": model.patch_embed.num_patches + model.num_prefix_tokens,
                "num_classes": model.num_classes}
