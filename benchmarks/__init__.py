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
