# Two entry points (README Quickstart): `make demo` and `make test`.
# Both build a project-local virtual environment in .venv/ first; nothing else is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := test,mpi,docs,torch,triton
# The versions the project tests with: torch 2.13.0 is the CPU wheel this project's machines
# install from a local file (the extras themselves take version ranges).
CONSTRAINTS := constraints.txt

.PHONY: setup demo test lint unit docs clean

setup: $(VENV)/.installed

# Re-install whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	@# headless Chromium for the docs' browser test, where this machine can install it
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null 2>&1 \
	  && timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
	  && echo "installed chromium (the docs' browser test)"; } \
	  || echo "note: no chromium here: the docs' browser test will be skipped"
	touch $@

demo: setup
	$(BIN)/ringsim demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: setup
	$(BIN)/python -m pytest -q

test: lint unit

# The site (docs/), tutorials executed, warnings as errors; tests/test_docs.py builds it too.
docs: setup
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
