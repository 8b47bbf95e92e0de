# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Each creates the project's virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Where the raw data lives; override with `make demo DATA=/path/to/images`.
DATA   ?= ../shared/data/pbc224
OUT    ?= runs/demo

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

PROFILE ?= quick

demo: venv
	$(BIN)/bloodcell pipeline --data "$(DATA)" --out "$(OUT)" --profile $(PROFILE)

# Browser tests drive Debian's chromium; install it when absent (root, as on CI).
test: venv
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: browser tests will be skipped"
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
