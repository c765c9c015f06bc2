# xcp-fastpath. Two commands for a new user on Debian 12 (as root):  make demo   and   make test
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
PYTEST_ARGS ?= -n 2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all setup ext lint test pytest demo bench clean dom0-bundle

all: test

# Idempotent: apt only for missing packages, pip only when the project files changed.
setup: $(STAMP) ext

$(STAMP): pyproject.toml setup.py scripts/setup-system.sh scripts/link-debian-modules.sh
	scripts/setup-system.sh
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	scripts/link-debian-modules.sh $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# The compiled speedups (optional at run time, required in CI: FASTPATH_REQUIRE_SPEEDUPS=1).
ext: $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c 'import agent.speedups as s; print("speedups:", "compiled" if s.COMPILED else "pure Python")'

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/vermin --target=3.6- --no-tips --violations agent/

pytest: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint pytest

demo: setup
	$(PY) -m hostsim.demo

bench: setup
	$(PY) -m bench.vhd_read

dom0-bundle: setup
	$(PY) -m agent.bundle -o dist/

clean:
	rm -rf build dist .pytest_cache .hypothesis agent/_speedups*.so ext/*.c
	find . -name __pycache__ -prune -exec rm -rf {} +
