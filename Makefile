# The README's two commands: `make demo` (set up + the main job) and `make test` (set up + tests).
# Every target runs $(PYTHON), and the tools it installed: make demo PYTHON=.venv/bin/python uses
# that virtual environment throughout (its pip, ruff, mypy, pytest and memformer-fast).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Where pip put $(PYTHON)'s console scripts (memformer-fast).
SCRIPTS = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
# The CPU build of torch (a pinned version; an unpinned torch pulls CUDA packages) and the triton
# release the GPU machines run, so CI checks the compiler that runs there. Everything else is
# unpinned: a fresh environment gets the newest release of each.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0
# The tests `make test` leaves to `make test-slow` (CI runs both: together, the whole suite).
SLOW ?= slow or aot or interpreter

.PHONY: install demo test test-slow lint bench real-text check-gpu-build check-aot-triton-latest

# setuptools >= 70.1 builds the editable wheel itself (the wheel package no longer provides
# bdist_wheel to older ones, and pip then falls back to a legacy `setup.py develop`); the
# extension is compiled by the ninja installed here (torch looks for it on PATH).
install:
	$(PIP) install -q --upgrade "setuptools>=70.1" wheel ninja
	$(PIP) install -q "$(TORCH)" "$(TRITON)"
	PATH="$(SCRIPTS):$$PATH" $(PIP) install -q --no-build-isolation -e ".[test,demo,hf]"

demo: install
	$(SCRIPTS)/memformer-fast demo

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

test: install lint
	$(PYTHON) -m pytest -q --durations=15 -m "not ($(SLOW))"

test-slow: install
	$(PYTHON) -m pytest -q --durations=15 -m "$(SLOW)"

# The peer (lucidrains' memformer) declares only torch and einops: --no-deps keeps our torch.
# The full set (--benchmark-long): the report in benchmarks/results/cpu covers all of it.
bench: install
	$(PIP) install -q --no-deps "memformer==0.3.1" "einops>=0.3"
	$(PYTHON) -m pytest benchmarks/ --benchmark-only --benchmark-long \
		--benchmark-json=benchmarks/results/cpu/cpu.json
	$(PYTHON) benchmarks/report.py benchmarks/results/cpu/cpu.json

# What the memory buys on real text: the Memformer, the same model with its memory reset every
# segment, a Transformer-XL cache and a decoder with twice the context, each trained 1,000 steps on
# the standard library's sources and on pydoc's reference prose (8 trainings, 2 at a time, one
# thread each: about an hour on 2 cores), evaluated on held-out documents; writes
# benchmarks/results/real_text/results.{md,json} and a plot. `--smoke`: about a minute.
real-text: install
	$(PYTHON) benchmarks/real_text.py

# This checkout's files (tracked and untracked, not ignored) copied to $(1)/src, so a build there
# never replaces this checkout's own extension.
define copy_sources
	rm -rf $(1)/src && mkdir -p $(1)/src
	git ls-files -z -c -o --exclude-standard | tar --null -T - --ignore-failed-read -cf - \
		| tar -xf - -C $(1)/src
endef

# The GPU image's build, checked on this CPU machine: torch 2.11.0 (pip brings its CUDA 13.0 build
# and libraries) in a venv of its own, the extension compiled with CUDA for sm_80 and sm_90 by the
# local nvcc, imported, and the extension's and the ops' tests run under that torch (with the
# traced CUDA path of the triton_ops: what torch.compile makes of them depends on torch's version).
# CUDA_HOME: the toolkit root (bin/nvcc, lib64/libcudart.so); setup.py finds one if unset.
GPU_TORCH ?= torch==2.11.0
GPU_BUILD_DIR ?= build/gpu-image
GPU_VENV ?= $(GPU_BUILD_DIR)/venv
GPU_ARCHS ?= 8.0;9.0
check-gpu-build:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade "$(GPU_TORCH)" numpy ninja "setuptools>=70.1" wheel \
		pytest hypothesis
	$(call copy_sources,$(GPU_BUILD_DIR))
	cd $(GPU_BUILD_DIR)/src && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(GPU_ARCHS)" \
		MAX_JOBS=$${MAX_JOBS:-2} $(abspath $(GPU_VENV))/bin/python -m pip install -q \
		--no-build-isolation --no-deps -e . > build.log 2>&1 || { tail -40 build.log; exit 1; }
	cd $(GPU_BUILD_DIR)/src && $(abspath $(GPU_VENV))/bin/python -c "$$CHECK_GPU_EXTENSION"
	cd $(GPU_BUILD_DIR)/src && $(abspath $(GPU_VENV))/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_replay.py tests/test_ops.py tests/test_traced_kernels.py

define CHECK_GPU_EXTENSION
import torch
from memformer_fast.replay import build_info
info = build_info()
print("torch", torch.__version__, "CUDA", torch.version.cuda, "| _C:", info)
assert torch.version.cuda, "the GPU image's torch is a CUDA build"
assert info["with_cuda"], "_C was built without CUDA"
assert ";".join(info["cuda_archs"]) == "$(GPU_ARCHS)", info["cuda_archs"]
endef
export CHECK_GPU_EXTENSION

# The ahead-of-time compile test under the newest Triton pip serves (make test checks the pinned
# $(TRITON), the GPU image's): the package accepts triton>=3.6, so both must compile without spills.
LATEST_DIR ?= build/triton-latest
LATEST_VENV ?= $(LATEST_DIR)/venv
check-aot-triton-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade "$(TORCH)" numpy ninja "setuptools>=70.1" wheel pytest
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade triton
	$(call copy_sources,$(LATEST_DIR))
	cd $(LATEST_DIR)/src && $(abspath $(LATEST_VENV))/bin/python -m pip install -q \
		--no-build-isolation --no-deps -e . > build.log 2>&1 || { tail -40 build.log; exit 1; }
	cd $(LATEST_DIR)/src && $(abspath $(LATEST_VENV))/bin/python -m pytest -q -s \
		-p no:cacheprovider tests/test_aot_compile.py
