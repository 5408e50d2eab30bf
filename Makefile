# genlab: the README's commands. `make test` is all CI runs; it installs what it needs itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PACKAGE_DIRS := $(patsubst %/pyproject.toml,%,$(wildcard packages/*/pyproject.toml))
FMNIST_DIR := /usr/share/datasets/fashion-mnist
OPENCV_DATA := /usr/share/doc/opencv-doc/examples/data
PYTEST_ARGS ?= -n 2
STAMP := $(VENV)/.genlab-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data browser test test-fast lint format bench demo demo-train demo-taming gallery clean help

help:
	@echo "make install   venv + pinned torch + genlab-core + every package (editable)"
	@echo "make data      Debian data packages: dataset-fashion-mnist, opencv-doc"
	@echo "make test      install + data + browser, then the whole pytest suite (what CI runs)"
	@echo "make browser   Debian chromium for the gallery's browser test (skipped with a reason without it)"
	@echo "make lint      ruff"
	@echo "make bench     benchmark scripts in bench/ (prints ratios; appends to bench/RESULTS.md)"
	@echo "make demo      the flagship chain from the shipped checkpoints: teacher vs 4-step student (outputs/demo/, ~1 min)"
	@echo "               make demo PROMPT=\"a photo of a sneaker\" [N=40]   adds your own prompt (N: fewer samples, faster)"
	@echo "make demo-train  the same chain retrained from scratch (runs/demo-train/, outputs/demo-train/, < 30 min)"
	@echo "make gallery   every package's shipped checkpoint at work, one HTML page (outputs/gallery/index.html)"
	@echo "make demo-taming  taming end to end on Fashion-MNIST: VQGAN, transformer, grid (runs/demo/, ~6 min)"

install: $(STAMP)

# Re-runs when a pyproject or the pins change. torch/torchvision go in first so nothing can swap them.
$(STAMP): constraints.txt shared/pyproject.toml $(addsuffix /pyproject.toml,$(PACKAGE_DIRS))
	@echo "install [1/4]: virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "install [2/4]: $(TORCH_PINS) (pinned first, so nothing can swap them)"
	$(PIP) install --progress-bar off -c constraints.txt $(TORCH_PINS)
	@echo "install [3/4]: genlab-core and $(words $(PACKAGE_DIRS)) packages, editable: $(notdir $(PACKAGE_DIRS)) (a few minutes the first time)"
	$(PIP) install --progress-bar off -c constraints.txt -e "shared[dev]" $(addprefix -e ,$(PACKAGE_DIRS))
	@echo "install [4/4]: checking the torch pin"
	$(PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"
	@touch $@
	@echo "install: done ($(VENV); console scripts in $(VENV)/bin)"

data:
	@if [ -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ] && [ -f $(OPENCV_DATA)/vtest.avi ]; then \
	  echo "data: Fashion-MNIST and the OpenCV samples are present"; \
	else \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq dataset-fashion-mnist opencv-doc >/dev/null && \
	  echo "data: installed dataset-fashion-mnist and opencv-doc"; \
	fi

test: install data browser
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# The flagship chain from the checkpoints shipped in the packages (no training): the 28-step guided teacher vs its
# 4-step LADD student on the same prompts and noise, FID-FMNIST / class accuracy / seconds per image of each.
# PROMPT="..." (any characters: it reaches ladd-demo through the environment, not the command line) adds your own
# prompt; N=40 samples fewer images per model (a quick look; FID at small N is not comparable).
demo: install data
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GENLAB_DEMO_PROMPT="$$PROMPT" $(VENV)/bin/ladd-demo $(if $(N),num_samples=$(N))

# The same chain from scratch (autoencoder -> teacher -> synthetic data -> student), then the same summary.
demo-train: install data
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/ladd-train-demo

gallery: install data
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/gencore-gallery --out outputs/gallery

# taming end to end, trained here in ~6 min (the demo before the flagship chain shipped)
demo-taming: install data
	$(PY) -m taming.demo --out runs/demo

# Chromium for the gallery's browser test (Debian's package; Playwright drives it). Never fatal: without it that one
# test skips and says why.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "browser: $$(chromium --version 2>/dev/null | head -1)"; \
	else ($(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null \
	  && echo "browser: installed chromium") || echo "browser: could not install chromium; the gallery browser test will skip"; fi

bench: install
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs outputs samples multirun lightning_logs
