# The README's two commands: `make demo` (set up + the main job) and `make test` (set up + tests).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# The CPU build of torch (a pinned version; an unpinned torch pulls CUDA packages) and the triton
# release the GPU machines run, so CI checks the compiler that runs there.
TORCH ?= torch==2.13.0
TRITON ?= triton==3.6.0

.PHONY: install demo test lint bench real-text

install:
	$(PIP) install -q "$(TORCH)" "$(TRITON)" ninja "setuptools>=64" wheel
	$(PIP) install -q --no-build-isolation -e ".[test,demo,hf]"

demo: install
	memformer-fast demo

lint:
	ruff check .
	ruff format --check .
	mypy

test: install lint
	$(PYTHON) -m pytest -q

# The peer (lucidrains' memformer) declares only torch and einops: --no-deps keeps our torch.
bench: install
	$(PIP) install -q --no-deps "memformer==0.3.1" "einops>=0.3"
	MEMFORMER_BENCH_THREADS=1 $(PYTHON) -m pytest benchmarks/ --benchmark-only \
		--benchmark-json=benchmarks/results/cpu/cpu.json
	$(PYTHON) benchmarks/report.py benchmarks/results/cpu/cpu.json

# What the memory buys on real text: two ~7-minute trainings side by side on the standard library's
# sources (with memory, and reset every segment), then both evaluated on held-out files; writes
# benchmarks/results/real_text/results.{md,json}. `python benchmarks/real_text.py --smoke`: ~1 min.
real-text: install
	$(PYTHON) benchmarks/real_text.py
