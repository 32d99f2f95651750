# The few commands people type. Each sets up .venv on first use (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench bench-overload clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# Without a GPU, take the CPU build of torch first; a plain requirement pulls the CUDA one.
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q -e '.[dev,bench,gpu]'; \
	else \
		$(BIN)/python -m pip install -q torch==2.13.0 && $(BIN)/python -m pip install -q -e '.[dev,bench]'; \
	fi
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/imagegen serve

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-overload: $(STAMP)
	$(BIN)/python -m benchmarks.overload

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
