# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit bench clean proto

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

## run: one node with the embedded SQLite store and the example actors
run: $(STAMP)
	@mkdir -p .spawnmesh
	@test -s .spawnmesh/statestore.key || $(BIN)/spawnmesh keygen --out .spawnmesh/statestore.key
	SPAWNMESH_STATESTORE_KEY_FILE=.spawnmesh/statestore.key $(BIN)/spawnmesh run

## test: ruff, mypy and the whole pytest suite (installs what it needs)
test: $(STAMP) lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check spawnmesh tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	bash scripts/test-dbs.sh $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/invoke_local.py

## proto: regenerate spawnmesh/host/gen (betterproto2 + grpclib stubs) from spec/*.proto
proto: $(STAMP)
	$(BIN)/python -m spawnmesh.host.codegen

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
