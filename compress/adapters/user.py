"""Your own architecture, after `sources.user` converted its recognised blocks to the neutral forms."""
from __future__ import annotations

from torch import nn

from ..core.errors import InputError
from ..core.modules import SeparateQK, SeparateVO, ViTBlock


def unmapped_text(items: list[str]) -> str:
    """Unmapped blocks ("NAME (WHY)") for one line: blocks that failed for the same reason named once, as
    "first, ..., last (N blocks: WHY)" (EfficientNet-Lite1: 21 blocks, one reason, was a 5,000-character line)."""
    groups: dict[str, list[str]] = {}
    for item in items:
        name, sep, why = item.partition(" (")
        groups.setdefault(why[:-1] if sep and why.endswith(")") else "", []).append(name)
    out = []
    for why, names in groups.items():
        if len(names) > 3:
            out.append(f"{names[0]}, {names[1]}, ..., {names[-1]} ({len(names)} blocks" + (f": {why})" if why else ")"))
        else:
            out.append(", ".join(names) + (f" ({why})" if why else ""))
    return "; ".join(out)


class UserAdapter:
    """One instance per model: it knows where that model's blocks are and which could not be mapped."""

    def __init__(self, family: str, blocks: list[str], unmapped: list[str], input_size, tokens: int | None):
        self.name, self.family = f"user-{family}", family
        self.blocks, self.unmapped = blocks, unmapped  # qualified names of converted / unconvertible blocks
        self._input_size, self.tokens = input_size, tokens

    def matches(self, model: nn.Module) -> bool:
        return all(_has(model, n) for n in self.blocks)

    def _refuse_unmapped(self, what: str) -> None:
        if self.unmapped:
            raise InputError(f"blocks {unmapped_text(self.unmapped)} of this model could not be mapped to the neutral {what} "
                             "form, so passes that rewrite blocks cannot run on it; use export/distill only, or "
                             "make those blocks standard")

    def vit_blocks(self, model: nn.Module) -> list[ViTBlock]:
        if self.family != "vit":
            raise InputError("this model has no transformer blocks")
        self._refuse_unmapped("ViT block")
        return [model.get_submodule(n) for n in self.blocks]

    def res_blocks(self, model: nn.Module) -> list[nn.Module]:
        if self.family != "resnet":
            raise InputError("this model has no residual conv blocks")
        self._refuse_unmapped("residual block")
        return [model.get_submodule(n) for n in self.blocks]

    def layers(self, model: nn.Module) -> list[tuple[str, str]]:
        inside, out = set(), []
        for n in self.blocks:
            blk = model.get_submodule(n)
            inside |= {f"{n}.{c}" for c, _ in blk.named_modules()}
            if isinstance(blk, ViTBlock):
                if isinstance(blk.attn.score, SeparateQK):
                    out += [(f"{n}.attn.score.q", "attn"), (f"{n}.attn.score.k", "attn")]
                if isinstance(blk.attn.value, SeparateVO):
                    out += [(f"{n}.attn.value.v", "attn"), (f"{n}.attn.value.proj", "attn")]
                if blk.mlp is not None:
                    out += [(f"{n}.mlp.fc1", "mlp"), (f"{n}.mlp.fc2", "mlp")]
            else:
                out += [(f"{n}.{c}", "conv") for c, m in blk.named_modules() if isinstance(m, nn.Conv2d)]
        rest = [(n, m) for n, m in model.named_modules() if n not in inside and not any(n.startswith(b + ".") for b in self.blocks)]
        out += [(n, "stem") for n, m in rest if isinstance(m, nn.Conv2d) and self.family == "resnet"]
        heads = [n for n, m in rest if isinstance(m, nn.Linear)]
        return out + ([(heads[-1], "head")] if heads else [])

    def feature_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.get_submodule(n) for n in self.blocks]

    def input_size(self, model: nn.Module):
        return tuple(self._input_size) if self.family == "vit" else None

    def describe(self, model: nn.Module) -> dict:
        heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        nc = model.get_submodule(heads[-1]).out_features if heads else None
        info = {"blocks": len(self.blocks), "num_classes": nc, "unmapped": self.unmapped}
        if self.family == "vit":
            b = model.get_submodule(self.blocks[0])
            score = b.attn.score
            return {**info, "width": b.norm1.normalized_shape[0], "tokens": self.tokens,
                    "heads": score.heads if hasattr(score, "heads") else None}
        stages = sorted({n.rpartition(".")[0] for n in self.blocks})
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in self.blocks})
        return {**info, "stages": [sum(n.rpartition(".")[0] == s for n in self.blocks) for s in stages],
                "block_type": "/".join(kinds)}


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False
