# make run   - install into .venv if needed, use or start Redis, start gateway + transcriber
# make test  - install if needed, run the whole test suite (unit + integration + browser)
# make test-long - the same with the long load-style tests (STT_LONG_TESTS=1)
# make bench-gpu - on a machine with an NVIDIA GPU: install, check the device, run the capacity
#              bench at 8-128 streams with and without batching (under 10 min; docs/operations.md)
# make bench-gpu DRY_RUN=1 - the same plan at tiny sizes on the CPU
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: install
	./scripts/run.sh

test: install
	$(BIN)/python -m pytest

# everything, the long load-style tests too (about 5 more minutes on 2 cores)
test-long: install
	STT_LONG_TESTS=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
	$(BIN)/python -m bench $(ARGS)

# CTranslate2's CUDA build loads libcublas.so.12: from the system (CUDA 12 images have it),
# else from the nvidia-cublas-cu12 wheel (bench/gpu.py puts its directory on LD_LIBRARY_PATH).
bench-gpu: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,bench]'
ifndef DRY_RUN
	$(BIN)/python -c 'import ctypes; ctypes.CDLL("libcublas.so.12")' 2>/dev/null \
	  || $(BIN)/pip install --quiet 'nvidia-cublas-cu12>=12.1,<13'
endif
	$(BIN)/python -m bench.gpu $(if $(DRY_RUN),--dry-run) $(ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
