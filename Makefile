# The two commands of the README: `make run` and `make test`. Everything else is a helper.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck unit bench clean proto dist

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

## dist: one executable file of the node per CPU (pex, --venv --sh-boot), for Linux devices with
## Python 3.11 and glibc >= 2.28 (docs/edge.md): dist/spawnmesh-x86_64, dist/spawnmesh-aarch64.
## Each target's wheel tags come from scripts/pex-platform.py (a pex "complete platform").
DIST_GLIBC ?= 2.28
DIST_ARCHES ?= x86_64 aarch64
dist: $(STAMP)
	@mkdir -p dist build
	@for arch in $(DIST_ARCHES); do \
	    echo "pex: dist/spawnmesh-$$arch ($$arch, glibc >= $(DIST_GLIBC), the venv's Python)"; \
	    $(BIN)/python scripts/pex-platform.py $$arch $(DIST_GLIBC) > build/pex-$$arch.json \
	        || exit 1; \
	    $(BIN)/pex . --venv --sh-boot --console-script spawnmesh \
	        --complete-platform build/pex-$$arch.json -o dist/spawnmesh-$$arch || exit 1; \
	done
	@ls -l dist/

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache dist build
