"""Per-block analysis of a ViT on calibration data (DESIGN §4): where the model can be cut.

Skip-KL is measured by ablation (the KL gradient is zero at the teacher itself); token
cosines leave out high-norm outlier tokens, which would otherwise dominate them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core.diskio import writing
from ..core.errors import InputError
from ..core.merging import best_match_cosine, prefix_tokens
from ..core.probe import capture, greedy_mlp_skip, skip_kl

OUTLIER = 3.0  # a token whose norm exceeds this multiple of its image's median token norm is an outlier
EPS = 0.5  # default coding-rate distortion epsilon


def _cos(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean token cosine over the kept (non-outlier) tokens."""
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return float(c[keep].mean())


def _ratio(f: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> float:
    """Update size ||f(x)|| / ||x|| averaged over kept tokens (the residual stream's velocity)."""
    return float((f.double().norm(dim=-1) / x.double().norm(dim=-1).clamp_min(1e-12))[keep].mean())


def coding_rate(z: torch.Tensor, eps: float) -> float:
    """R(Z) = 1/2 logdet(I + d/(N eps^2) Z Z^T) of unit-norm tokens, per image, averaged; via the N x N Gram."""
    z = torch.nn.functional.normalize(z.double(), dim=-1)  # (B, N, d)
    n, d = z.shape[1], z.shape[2]
    gram = z @ z.transpose(1, 2)  # (B, N, N): same determinant as the d x d form (Sylvester)
    eye = torch.eye(n, dtype=torch.float64)
    return float(0.5 * torch.logdet(eye + d / (n * eps ** 2) * gram).mean())


@torch.no_grad()
def analyze(model, adapter, x: torch.Tensor, eps: float = EPS) -> dict:
    """Every DESIGN §4 measure per block; see docs/analyze-verify.md for definitions."""
    if adapter.family != "vit":
        raise InputError(f"analyze measures transformer blocks; {adapter.name} models have none (use a ViT checkpoint)")
    if eps <= 0:
        raise InputError(f"--eps {eps}: the coding-rate epsilon must be positive")
    blocks = adapter.vit_blocks(model)
    ref = model(x)
    n = len(blocks)
    ins = capture(model, blocks, x, inputs=True)
    outs = capture(model, blocks, x)
    attn_out = capture(model, [b.ls1 for b in blocks], x)
    logits = capture(model, [b.attn.score for b in blocks], x)
    hidden = capture(model, [b.mlp.fc1 for b in blocks if b.mlp is not None and hasattr(b.mlp, "fc1")], x)
    hidden_iter = iter(hidden)
    keys = capture(model, [b.attn.score.k if hasattr(b.attn.score, "k") else b.attn.score for b in blocks], x)
    prefix = prefix_tokens(model, int(ins[0].shape[1]))
    rows, prev_map = [], None
    for i, b in enumerate(blocks):
        xi, xo = ins[i], outs[i]
        xm = xi + attn_out[i]
        norms = xi.norm(dim=-1)
        keep = norms <= OUTLIER * norms.median(dim=-1, keepdim=True).values  # (B, N)
        amap = logits[i].softmax(-1).mean(1).flatten(1).double()  # head-mean map, (B, N*N)
        uniform = torch.full_like(amap, 1.0 / logits[i].shape[-1])
        has_mlp = b.mlp is not None
        row = {
            "block": i,
            "influence": 1 - _cos(xi, xo, keep), "influence_attn": 1 - _cos(xi, xm, keep),
            "influence_mlp": 1 - _cos(xm, xo, keep) if has_mlp else None,
            "influence_cls": 1 - float(torch.nn.functional.cosine_similarity(xi[:, 0].double(), xo[:, 0].double(), dim=-1).mean()),
            "update_attn": _ratio(attn_out[i], xi, keep), "update_mlp": _ratio(xo - xm, xm, keep) if has_mlp else None,
            "skip_kl_attn": skip_kl(model, b.ls1, x, ref),
            "skip_kl_mlp": skip_kl(model, b.ls2, x, ref) if has_mlp else None,
            "coding_rate": coding_rate(xo, eps),
            "mlp_sparsity": float((next(hidden_iter) <= 0).double().mean()) if has_mlp and hasattr(b.mlp, "fc1") else None,
            "feature_cos_prev_cls": (float(torch.nn.functional.cosine_similarity(outs[i - 1][:, 0].double(), xo[:, 0].double(), dim=-1).mean())
                                     if i else None),
            "attn_cos_prev": float(torch.nn.functional.cosine_similarity(prev_map, amap, dim=-1).mean()) if i else None,
            "attn_cos_uniform": float(torch.nn.functional.cosine_similarity(uniform, amap, dim=-1).mean()),
            "outlier_tokens": float(1 - keep.double().mean()),
            # token_merge's matching: each even token's best cosine among the odd ones, keys averaged over heads
            "token_match": (float(best_match_cosine(keys[i].view(*keys[i].shape[:2], b.attn.score.heads, -1).mean(2),
                                                    prefix).mean()) if hasattr(b.attn.score, "k") else None),
        }
        rows.append(row)
        prev_map = amap
    rank = lambda key: [r["block"] for r in sorted((r for r in rows if r[key] is not None), key=lambda r: r[key])]
    return {"blocks": rows, "images": len(x), "tokens": int(ins[0].shape[1]), "eps": eps, "outlier_factor": OUTLIER,
            "input_coding_rate": coding_rate(ins[0], eps),
            "mlp_rank": rank("skip_kl_mlp"), "attn_rank": rank("skip_kl_attn"),
            "greedy_mlp": greedy_mlp_skip(model, adapter, x, sum(b.mlp is not None for b in blocks))}


COLUMNS = [("block", "block", "{}"), ("influence", "1-cos", "{:.3f}"), ("influence_attn", "1-cos attn", "{:.3f}"),
           ("influence_mlp", "1-cos mlp", "{:.3f}"), ("update_attn", "|f|/|x| attn", "{:.3f}"),
           ("update_mlp", "|f|/|x| mlp", "{:.3f}"), ("skip_kl_attn", "skipKL attn", "{:.4f}"),
           ("skip_kl_mlp", "skipKL mlp", "{:.4f}"), ("coding_rate", "R(Z)", "{:.2f}"),
           ("mlp_sparsity", "mlp act<=0", "{:.3f}"), ("feature_cos_prev_cls", "cos prev CLS", "{:.3f}"),
           ("attn_cos_prev", "A cos prev", "{:.3f}"), ("attn_cos_uniform", "A cos unif", "{:.3f}"),
           ("token_match", "tok match", "{:.3f}")]


def table(result: dict) -> list[tuple[str, ...]]:
    head = tuple(c[1] for c in COLUMNS)
    body = [tuple("-" if r[k] is None or (isinstance(r[k], float) and math.isnan(r[k])) else f.format(r[k])
                  for k, _, f in COLUMNS) for r in result["blocks"]]
    return [head, *body]


def chart(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["blocks"]
    idx = [r["block"] for r in rows]
    val = lambda k: [r[k] if r[k] is not None else float("nan") for r in rows]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    w = 0.4
    for a, (k1, k2, title) in zip(ax[0], (("influence_attn", "influence_mlp", "block influence 1 - cos(x_in, x_out)"),
                                          ("skip_kl_attn", "skip_kl_mlp", "teacher KL when the half is skipped"))):
        a.bar([i - w / 2 for i in idx], val(k1), w, label="attention")
        a.bar([i + w / 2 for i in idx], val(k2), w, label="MLP")
        a.set_title(title, fontsize=10)
        a.legend(fontsize=8)
    ax[0][1].set_yscale("log")
    ax[1][0].plot(idx, val("coding_rate"), "o-")
    ax[1][0].axhline(result["input_coding_rate"], color="k", lw=0.8, ls="--", label="block 0 input")
    ax[1][0].set_title(f"coding rate of block outputs (eps {result['eps']:g})", fontsize=10)
    ax[1][0].legend(fontsize=8)
    for k, lbl in (("mlp_sparsity", "MLP activations <= 0"), ("attn_cos_prev", "attention cos with previous block"),
                   ("attn_cos_uniform", "attention cos with uniform"), ("feature_cos_prev_cls", "CLS cos with previous block")):
        ax[1][1].plot(idx, val(k), "o-", label=lbl)
    ax[1][1].set_title("sparsity and similarity", fontsize=10)
    ax[1][1].legend(fontsize=8)
    for a in ax.flat:
        a.set_xlabel("block")
        a.set_xticks(idx)
    fig.suptitle(f"compress analyze: {result['images']} images, {result['tokens']} tokens", fontsize=11)
    fig.tight_layout()
    with writing(Path(path).name, Path(path).parent, temps=[path]):
        fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
