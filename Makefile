# Everything a fresh clone needs: `make run` and `make test` create the virtualenv
# and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= collector.yaml

.PHONY: install install-test bytecode browser run test fuzz check-no-compiler lint fmt bench bench-query bench-profile clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# setup.py builds collector/_wire.c in place; a changed source rebuilds it.
$(VENV)/.installed: pyproject.toml setup.py collector/_wire.c | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Our own modules' bytecode, written even where PYTHONDONTWRITEBYTECODE is set (this
# machine sets it): without it every start compiles them again (~0.1-0.15 s of a ~1 s
# start). Only what changed is compiled; an edited module is compiled in memory as usual.
bytecode: install
	@$(BIN)/python -m compileall -q -j 0 collector processors exporters

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install bytecode
	$(BIN)/calltrace run --config $(CONFIG)

# The explorer's browser test drives Debian's Chromium through Playwright.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	  || echo "could not install chromium (not root?); browser tests will fail in CI"; }

# The suite twice: as installed (the C extension built), then on the pure Python path
# (CALLTRACE_NATIVE=0), which must behave the same; tests about the C code itself skip there.
test: install-test browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	CALLTRACE_NATIVE=0 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fuzz targets (tests/fuzz, and test_wire's C-against-Python tests) for longer, with
# collector._wire built with AddressSanitizer and UBSan into build/sanitized/ (the
# in-place build is left alone) and loaded from there: FUZZ_EXAMPLES examples a target.
FUZZ_EXAMPLES ?= 5000
SANITIZED := build/sanitized
CC ?= cc
fuzz: install-test
	@mkdir -p $(SANITIZED)
	$(CC) -shared -fPIC -O1 -g -std=c11 -Wall \
	  -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
	  -I"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
	  collector/_wire.c -o $(SANITIZED)/_wire.so
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
	  CALLTRACE_NATIVE_MODULE=$(SANITIZED)/_wire.so $(BIN)/python -c \
	  "from collector import wire; assert wire.native.__file__.endswith('$(SANITIZED)/_wire.so')"
	LD_PRELOAD="$$($(CC) -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  CALLTRACE_NATIVE_MODULE=$(SANITIZED)/_wire.so CALLTRACE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(BIN)/python -m pytest -q -p no:randomly --timeout=0 tests/fuzz tests/core/test_wire.py \
	  $(PYTEST_ARGS)

# A fresh install where the C extension cannot be built (CC=false: no compiler): setup.py
# leaves it out, and calltrace runs on the pure Python path. The tracked files are copied
# to build/no-compiler/ (the fixtures are found through build/shared).
NO_COMPILER := build/no-compiler
check-no-compiler:
	rm -rf $(NO_COMPILER) && mkdir -p $(NO_COMPILER)
	git ls-files -z | tar --null -cf - -T - | tar -xf - -C $(NO_COMPILER)
	ln -sfn "$(abspath ../shared)" build/shared
	$(PYTHON) -m venv $(NO_COMPILER)/.venv
	cd $(NO_COMPILER) && CC=false .venv/bin/pip install --quiet -e '.[test]'
	cd $(NO_COMPILER) && .venv/bin/python -c \
	  "from collector import wire; assert not wire.BUILT and wire.native is None, 'built'"
	cd $(NO_COMPILER) && env -u CI .venv/bin/python -m pytest -q -p no:cacheprovider \
	  tests/core/test_wire.py tests/exporters/test_sqlite.py tests/receivers/test_otlp_http.py

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Ingest side by side with the bare-parser yardstick (< 10 min); writes bench/results/latest.md.
bench: install-test bytecode
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Read latency on ~1M spans (builds the database first, ~2-3 min); bench/results/query.md.
bench-query: install-test
	$(BIN)/python -m bench.query $(BENCH_ARGS)

# The default pipeline under load with py-spy attached: bench/results/profile-ingest.{txt,svg}.
bench-profile: install-test
	$(BIN)/python -m bench.run --only-default --profile --output bench/results/profile-run.md

clean:
	rm -rf $(VENV) data build *.egg-info
