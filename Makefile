# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Both create or reuse .venv; where the venv has no torch they install the pinned CPU build
# (an unpinned torch pulls several GB of CUDA wheels).
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.edge-vla-installed
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_PIN)"
	$(VPY) -m pip install -q -e ".[export,pi0-export,dev,metaworld]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edge-vla demo

lint: $(STAMP)
	$(VPY) -m ruff check .

test: lint
	$(VPY) -m pytest -m "not gpu and not hardware" $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest benchmarks -s --benchmark-disable-gc $(PYTEST_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache runs
