# Two commands do all set-up on a fresh machine:
#   make train   - venv + deps, prepare the embedded corpus, train configs/tiny.yaml on CPU
#   make test    - venv + deps, the whole pytest suite
# torch is installed FIRST and pinned (TORCH_SPEC), so pip never resolves a CUDA build by itself
# on a CPU machine. On a GPU cluster: make train TORCH_SPEC=torch==2.11.0
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
DATA ?= data/stdlib
ARGS ?=
PY := $(VENV)/bin/python
# DeepSpeed on CPU: its accelerator and a fixed cache for the ops it JIT-compiles once.
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/megatron_lite/torch_extensions
STAMP := $(VENV)/.installed-$(subst =,_,$(subst >,_,$(subst <,_,$(TORCH_SPEC))))

.PHONY: install train data test test-fast lint warm bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/pip || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

data: $(STAMP)
	$(VENV)/bin/megatron-lite prepare-data --source stdlib --out $(DATA)

train: data
	$(VENV)/bin/megatron-lite train --config $(CONFIG) $(ARGS)

test: $(STAMP) warm
	$(PY) -m pytest -q tests

# Compile DeepSpeed's CPU communication op once (25-80 s the first time), outside any test timeout.
warm: $(STAMP)
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()" >/dev/null

# ruff (pinned in the dev extra; rules in pyproject.toml): pyflakes, bugbear, isort, line length 110.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) benchmarks/bench_throughput.py
	$(PY) benchmarks/bench_tp_comm.py
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_zero.py
	$(PY) benchmarks/bench_checkpoint.py
	$(PY) benchmarks/bench_launch.py
	$(PY) benchmarks/bench_plan.py
	$(PY) benchmarks/bench_parity.py
	$(PY) benchmarks/bench_context.py
	$(PY) benchmarks/plots.py

clean:
	rm -rf runs data
