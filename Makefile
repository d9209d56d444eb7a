# Fresh machine: `make demo` (set up, export the tiny model, serve it, generate one image)
# and `make test` (set up, run the test suite). Both create .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test

install: $(STAMP)

# One pip run resolves every pin together (see pyproject.toml for why).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(PYTEST_ARGS)
