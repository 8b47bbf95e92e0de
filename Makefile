# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates the project's virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Where datasets and ImageNet weights live. The defaults are the project's development layout
# (../shared beside the repository); override them, e.g. `make demo BLOODCELL_DATA=/data`.
export BLOODCELL_DATA    ?= $(abspath ../shared/data)
export BLOODCELL_WEIGHTS ?= $(abspath ../shared/weights)
DATA   ?= $(BLOODCELL_DATA)/pbc224
OUT    ?= runs/demo
PROFILE ?= quick

.PHONY: demo test test-fast lint-imports venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Exact versions from constraints.txt: the same build on every machine.
$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/bloodcell pipeline --data "$(DATA)" --out "$(OUT)" --profile $(PROFILE)

lint-imports: venv
	$(BIN)/lint-imports

# Everything, as CI runs it. Browser tests drive Debian's chromium; install it when absent (root, as on CI).
test: venv lint-imports
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: browser tests will be skipped"
	$(BIN)/python -m pytest -q

# The quick loop while editing: no training, no browser, no torchrun (under a minute).
test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow and not browser and not distributed"

clean:
	rm -rf $(VENV) runs
