# The two set-up commands of the README, plus the benchmark.
PYTHON ?= python3
# torch 2.13.0 is pinned for the install so CPU machines get the CPU build (an unpinned torch
# pulls a multi-GB CUDA build); on GPU machines install your CUDA torch first and set TORCH=.
TORCH ?= torch==2.13.0

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install -q $(TORCH) -e ".[dev]"

demo: install
	$(PYTHON) -m model "Tell me about mixtures of experts." --max-tokens 48

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/engine.py
