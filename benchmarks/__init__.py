"""The benchmark harness: `make bench` (python -m benchmarks.bench); see BENCHMARKS.md."""
