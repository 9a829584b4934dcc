# `make demo` and `make test` create (or reuse) .venv and install everything they need into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed compiles a CPU op on first use (about 30 s); keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

# Reinstall only when what pip installs changes: the stamp is named after a hash of pyproject.toml's build
# requirements, Python version, dependencies, extras and entry points. A file-date rule would reinstall after every
# fresh clone or checkout (git gives pyproject.toml a new date); the code itself is installed editable.
DEPS_HASH := $(shell sed -n -e '/^requires\(-python\)\? = /p' -e '/^dependencies = \[/,/^\]/p' \
	-e '/^\[project\.\(optional-dependencies\|scripts\)\]/,/^$$/p' pyproject.toml | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)

.PHONY: demo demo-ghost-bn test test-fast test-fake-cuda fake-cuda-coverage gpu-check docs-figures venv clean

$(STAMP):
	@echo "make: installing the harness and its dependencies into $(VENV) (first time: about 3 minutes with the DeepSpeed op build, 5.6 GB)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[test]'
	@# DeepSpeed's CPU op (deepspeed_shm_comm), built here once instead of by the first DeepSpeed run or test (about
	@# 45 s on 2 cores, into TORCH_EXTENSIONS_DIR; a failed build is only a warning: DeepSpeed builds it on first use).
	@echo "make: building DeepSpeed's CPU op into $(TORCH_EXTENSIONS_DIR) (about 45 s)"
	@$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load(verbose=False)" \
		> $(VENV)/deepspeed-op-build.log 2>&1 || echo "make: warning: the DeepSpeed op did not build (see $(VENV)/deepspeed-op-build.log); DeepSpeed will try again on first use"
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

demo: venv
	$(PY) -m harness demo

# The same study with ghost batch norm: a 1-D CNN on MNIST-1D (about 2 minutes on 2 idle cores).
demo-ghost-bn: venv
	$(PY) -m harness demo --study ghost-bn

# The suite on every core: one pytest worker per core (pytest-xdist; TEST_WORKERS=0: in this one process). Tests
# that share a module-scoped fixture stay on one worker, slow ones start first (tests/conftest.py).
TEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: venv
	$(PY) -m pytest $(PYTEST_PARALLEL)

# Without the tests marked slow (launchers, SLURM, long runs).
test-fast: venv
	$(PY) -m pytest $(PYTEST_PARALLEL) -m "not slow"

# The GPU code path on fake CUDA tensors, on any machine (docs/fake_cuda.md; part of `make test`): about 85 s.
test-fake-cuda: venv
	$(PY) -m pytest -m fake_cuda

# The share of the GPU-only lines that the fake-CUDA tier executes, and (--list) the lines it cannot reach.
fake-cuda-coverage: venv
	$(PY) benchmarks/fake_cuda_coverage.py --list

# On a GPU node: the gpu-marked tests, a torchrun training (nccl, bf16), STOP + resume, host syncs, benchmarks/gpu.py.
gpu-check: venv
	$(PY) benchmarks/gpu_check.py

# Rerun every command the docs quote and rewrite those blocks (and the figures in docs/) in place: about 10 minutes.
docs-figures: venv
	$(PY) docs/generate.py

clean:
	rm -rf runs .pytest_cache
