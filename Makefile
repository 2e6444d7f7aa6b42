# dfm_jax developer commands. Every target creates the virtual environment when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: venv test mutation lint format demo demo-video fashion-mnist bench study clean

venv: $(STAMP)

# Runtime dependencies only (enough for training, the demo and benchmarks).
$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(RUNTIME_STAMP)

# Plus the test runner, the linter and the reference implementations for parity tests.
$(STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

## test: run the whole test suite on 8 simulated CPU devices, in TEST_WORKERS pytest
## processes (pytest-xdist; each test file stays in one process, so its module fixtures
## are built once; files start slowest first, tests/conftest.py). TEST_WORKERS=0 runs it
## in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## mutation: mutation-test the method modules and the train step with mutmut (slow, not in CI;
## see docs/testing.md). MUTANTS="*objective.x_loss_fn__*" narrows it to matching mutants.
MUTANTS ?=
mutation: $(STAMP)
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 $(MUTANTS) || true
	$(VENV)/bin/mutmut results

## lint: ruff lint and format checks
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## format: apply ruff's fixes and formatting
format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
DEMO_WORKDIR ?= workdir/demo
DEMO_FLAGS ?=

## fashion-mnist: make sure the demo data is there (Debian package when root with apt)
fashion-mnist:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found in $(FMNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else \
	  echo "Fashion-MNIST: not installed; the demo will download it through TFDS"; \
	fi

## demo: train a small DFM model on Fashion-MNIST (CPU, minutes) and write samples
demo: $(RUNTIME_STAMP) fashion-mnist
	@download=""; [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || download="--config.data.download=True"; \
	$(PY) -m dfm_jax.main --config=configs/demo.py --workdir=$(DEMO_WORKDIR) $$download $(DEMO_FLAGS)
	$(PY) -m dfm_jax.eval --config=configs/demo.py --workdir=$(DEMO_WORKDIR) --demo_report \
	  $$download $(DEMO_FLAGS)
	@echo
	@echo "Demo finished. Outputs in $(DEMO_WORKDIR):"
	@echo "  samples/step_*_grid.png      class-conditional samples (one class per row)"
	@echo "  samples/step_*_previews.png  per example: stage-1 preview (16x16), final sample (32x32)"
	@echo "  eval/results.md              FD-FMNIST of the samples (lower is better)"
	@echo "  checkpoints/                 Orbax checkpoints (run 'make demo' again to resume)"
	@echo "  TensorBoard:                 $(VENV)/bin/tensorboard --logdir $(DEMO_WORKDIR)"

## demo-video: train a small video DFM on Moving Fashion-MNIST (CPU) and write GIFs
DEMO_VIDEO_WORKDIR ?= workdir/demo_video
demo-video: $(RUNTIME_STAMP) fashion-mnist
	$(PY) -m dfm_jax.main --config=configs/demo_video.py --workdir=$(DEMO_VIDEO_WORKDIR) $(DEMO_FLAGS)
	$(PY) -m dfm_jax.eval --config=configs/demo_video.py --workdir=$(DEMO_VIDEO_WORKDIR) \
	  --demo_report --num_samples=200 $(DEMO_FLAGS)
	@echo
	@echo "Video demo finished. Outputs in $(DEMO_VIDEO_WORKDIR):"
	@echo "  samples/step_*_grid.gif      class-conditional clips (one class per row)"
	@echo "  samples/step_*_previews.gif  per example: stage-1 preview (16x16), final clip (32x32)"
	@echo "  eval/results.md              FVD-FMNIST of the samples (lower is better)"
	@echo "  TensorBoard:                 $(VENV)/bin/tensorboard --logdir $(DEMO_VIDEO_WORKDIR)"

## bench: DFM vs Flow Matching train-step benchmark (BENCH_CONFIG=configs/demo.py)
BENCH_CONFIG ?= configs/demo.py
bench: $(RUNTIME_STAMP)
	$(PY) -m dfm_jax.bench --config=$(BENCH_CONFIG)

## study: the Fashion-MNIST four-method study (DFM, FM, Pyramidal, Cascaded; resumable)
STUDY_FLAGS ?=
study: $(RUNTIME_STAMP) fashion-mnist
	$(PY) experiments/fmnist_study.py $(STUDY_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
