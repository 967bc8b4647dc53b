# Everything a fresh machine needs: `make demo` (installs, then runs a real example), `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
PYTEST_ARGS ?=

.PHONY: setup runtime demo demo-strip demo-distill test test-fast bench bench-quick clean

setup: $(VENV)/.installed runtime

# The older onnxruntime every ONNX file is also run on (export.min_runtime), installed once into the cache
# ($COMPRESS_CACHE or ~/.cache/compress): `compress apply` never downloads. Under a second when already there.
runtime: $(VENV)/.installed
	$(BIN)/compress runtime prepare 1.16

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# A goal, not passes: 1.5x faster at batch 8 within 1 point of top-1; prints the plan table and the measured result
demo: setup
	$(BIN)/compress apply recipes/vit_plan_demo.yaml $(SHARED)/data/models/vit_cifar10 -o compressed/demo --overwrite

demo-strip: setup  # the earlier demo: a hand-written pass list (the MLP of blocks 2, 3, 4 stripped), no training
	$(BIN)/compress inspect $(SHARED)/data/models/vit_cifar10
	$(BIN)/compress apply recipes/vit_strip_half.yaml $(SHARED)/data/models/vit_cifar10 -o compressed/demo-strip --overwrite

demo-distill: setup
	$(BIN)/compress apply recipes/vit_strip_half_distill.yaml $(SHARED)/data/models/vit_cifar10 -o compressed/demo-distill --overwrite

bench: setup  # BENCHMARKS.md + benchmarks/results/ (about an hour on 2 cores)
	$(BIN)/python -m benchmarks.bench

bench-quick: setup  # smoke run of every contender kind (a couple of minutes); output in a temp dir
	$(BIN)/python -m benchmarks.bench --quick

# Three workers (one file each at a time, one torch thread each) on 2 cores: measured, the suite keeps 2 cores only
# ~60% busy with two, because many tests wait on a child process (batch, chaos, CLI runs). Then the tests that
# assert a measured speed alone: a speed gate timed while another test runs would measure the other test.
test: setup
	$(BIN)/python -m pytest -q -n 3 --dist loadfile -m "not timed" --durations=8 $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q -m timed --durations=4 $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) compressed .pytest_cache
