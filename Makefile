# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck protos check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tether demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=sdk/python --pyi_out=sdk/python --grpc_python_out=sdk/python \
		protos/tether/v1/sidecar.proto

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Benchmarks (not part of `make test`): `make bench` (< 10 min; ARGS=--with-litellm adds the
# LiteLLM proxy, installed into its own venv under ~/.cache/tether-bench), `make bench-quick`
# (< 60 s, for everyday use). See bench/RESULTS.md.
.PHONY: bench bench-quick

$(VENV)/.bench-stamp: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-stamp
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(VENV)/.bench-stamp
	$(BIN)/python -m bench --quick $(ARGS)
