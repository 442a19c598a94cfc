# The two commands: `make demo` and `make test`. Both create .venv on first use, from the lock
# (requirements/*.txt, exported from uv.lock by `make lock`): exact versions with their hashes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LOCKED := requirements/dev.txt
# pip installs from the lock only: every requirement pinned and hashed, the project itself built
# with the locked hatchling (no build isolation, so no unpinned backend is fetched)
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes
PIP_PROJECT := $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .

.PHONY: demo test lint typecheck protos check clean lock lock-upgrade

# A changed lock (or pyproject.toml) makes .venv anew, so it holds exactly what the lock says.
$(STAMP): $(LOCKED) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PIP_LOCKED) -r $(LOCKED)
	$(PIP_PROJECT)
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

# The lock: uv resolves pyproject.toml for every Python from 3.11 and every platform (markers
# kept) into pip's requirements format with hashes. bench.txt is the whole resolution; dev.txt
# and runtime.txt are its subsets (constrained by it, so a package has one version in all
# three). `make lock` keeps each pinned version that still fits pyproject.toml; `make
# lock-upgrade` takes the newest that fit (ARGS="--upgrade-package NAME" upgrades one). Then
# `make test`, and commit pyproject.toml and requirements/ together.
COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	pyproject.toml --group build
lock: | $(STAMP)
	$(COMPILE) $(ARGS) --extra dev --extra bench -o requirements/bench.txt
	$(COMPILE) --extra dev -c requirements/bench.txt -o requirements/dev.txt
	$(COMPILE) -c requirements/bench.txt -o requirements/runtime.txt

lock-upgrade: ARGS = --upgrade
lock-upgrade: lock

# Benchmarks (not part of `make test`): `make bench` (< 10 min; ARGS=--with-litellm adds the
# LiteLLM proxy, installed into its own venv under ~/.cache/tether-bench), `make bench-quick`
# (< 60 s, for everyday use). See bench/RESULTS.md.
.PHONY: bench bench-quick

$(VENV)/.bench-stamp: $(STAMP) requirements/bench.txt
	$(PIP_LOCKED) -r requirements/bench.txt
	touch $@

bench: $(VENV)/.bench-stamp
	$(BIN)/python -m bench $(ARGS)

bench-quick: $(VENV)/.bench-stamp
	$(BIN)/python -m bench --quick $(ARGS)
