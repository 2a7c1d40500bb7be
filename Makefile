# `make demo` and `make test` do all set-up themselves on a fresh clone.
#
# torch: CPU machines install the local torch==2.13.0 wheel (no CUDA download). On a GPU machine
# choose any other build, e.g.  make clean && make test TORCH="torch==2.6.0"  (TORCH is passed to
# pip as is, so an index option may follow the requirement).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=
# the suite runs in TEST_WORKERS pytest-xdist processes, a whole test file each (0: in this process)
TEST_WORKERS ?= 2

.PHONY: install demo test bench results tables clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e ".[test]"
	touch $@

demo: $(STAMP)
	$(BIN)/ecgtwin demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench --out bench-results

results: $(STAMP)
	$(BIN)/python -m bench.results --setting all --out results

tables: $(STAMP)
	$(BIN)/python -m bench.tables

clean:
	rm -rf $(VENV) $(DEMO_OUT) bench-results results .pytest_cache
