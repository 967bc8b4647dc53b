"""The benchmark harness: `make bench` (python -m benchmarks.bench); see BENCHMARKS.md."""
import os

# Before torch loads: OpenMP threads that spin-wait make torch 5-12x slower when other
# processes share the cores (measured on this 2-core machine); passive waiting costs little alone
# for the harness's own forwards and training.
SET_HERE = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def child_env(extra: dict | None = None) -> dict:
    """The environment of a `compress` child whose seconds a benchmark reports: the user's, without the passive
    waiting set above. Inherited, it made the children's two-thread LAPACK 3.5x slower (a 1024x1024 float32
    eigendecomposition: 0.20 s against 0.057 s), and it is not what a user runs with."""
    env = dict(os.environ)
    if SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    return {**env, **(extra or {})}


def nonzero_biases(model, seed: int = 0):
    """Random Linear biases for a random-weight model, as a trained one has: timm initialises them to zero, and the
    exporter folds an Add of zeros away, so the file would run 4 Adds per ViT block fewer than a refit student's
    (benchmarks.ceiling's first run: timm's teacher looked 8% faster than the loaded one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.02)
    return model
