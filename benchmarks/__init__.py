"""The benchmark harness: `make bench` (python -m benchmarks.bench); see BENCHMARKS.md."""
import os

# Before torch loads: OpenMP threads that spin-wait make torch 5-12x slower when other
# processes share the cores (measured on this 2-core machine); passive waiting costs little alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
