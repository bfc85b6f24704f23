# Two commands on a fresh machine: `make demo` (the main job end to end) and `make test`.
# Both create or reuse .venv; where the venv has no torch they install the pinned CPU build.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.edge-vla-installed
TORCH_PIN ?= torch==2.13.0
# PyPI's Linux torch is the CUDA build (several GB of nvidia-* wheels); PyTorch's CPU index serves
# `torch==X+cpu` and its dependencies. It is asked first, with a short socket timeout and no retries
# so that a machine which cannot reach it (pip's default: 180 s x 5 retries) falls back at once to the
# plain pin from your own pip configuration (a mirror, a local CPU wheel), with a warning.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX_TIMEOUT ?= 10
PYTEST_ARGS ?=

.PHONY: venv torch demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(MAKE) --no-print-directory torch VENV=$(VENV)
	$(VPY) -m pip install -q -e ".[export,pi0-export,dev,metaworld]"
	touch $(STAMP)

# torch before edge-vla's extras, which would otherwise pull an unpinned (CUDA) torch from PyPI.
torch:
	@$(VPY) -c "import torch" 2>/dev/null \
	|| $(VPY) -m pip install -q --timeout $(TORCH_INDEX_TIMEOUT) --retries 0 --index-url $(TORCH_CPU_INDEX) "$(TORCH_PIN)" \
	|| { echo "make: PyTorch's CPU index $(TORCH_CPU_INDEX) did not answer; installing $(TORCH_PIN) from your pip" \
	          "configuration instead (from PyPI alone that is the CUDA build, several GB)" >&2; \
	     $(VPY) -m pip install -q "$(TORCH_PIN)"; }

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
