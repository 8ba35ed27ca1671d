# Two commands on a fresh machine: `make demo` runs the engine, `make test` runs the tests.
# Both create .venv on first use. torch is pinned first: on these machines 2.13.0 is the CPU
# wheel on disk, while an unpinned torch would download a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.shardlm-installed

.PHONY: demo test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/shardlm generate --tensor-parallel-size 2 "Explain tensor parallelism in one sentence."

test: $(STAMP)
	$(PY) -m pytest -q
