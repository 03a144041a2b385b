# mailroute: set-up, run, test.  GNU make; written for a fresh Debian 12 machine, as root.
#
#   make run      the embedded demo: in-process broker, SQLite under var/, Maildirs from examples/
#   make test     the whole suite (installs Dovecot, and RabbitMQ/PostgreSQL when none runs)
#
# Every recipe runs under bash with -e -u -o pipefail, so the first failing command stops it.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# The recipes install packages and start services; running them side by side would race apt.
.NOTPARALLEL:

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.mailroute-installed
CONFIG ?= examples/mailroute.yaml
DEMO_DIR := var/demo
PYTEST_ARGS ?=
# Folders that `make lint` checks; those still holding no Python file are skipped.
LINT_PATHS := ingest parse route persist shared tests bench

# make screenshots: where the browser tests save the README's pictures of the operations page
SCREENSHOTS ?= examples/screenshots

FUZZ_SECONDS ?= 60
# make soak: the SIGKILL fault test, longer (messages, kills of each worker kind)
SOAK_MESSAGES ?= 20000
SOAK_KILLS ?= 10

.PHONY: help venv run services test lint bench clean distclean fuzz soak screenshots

# A venv whose Python no longer starts (its interpreter was removed or upgraded) or lost pip is
# rebuilt even when its stamp is newer than pyproject.toml.
ifneq ($(wildcard $(VENV_STAMP)),)
ifneq ($(shell "$(VENV_PY)" -c 'import pip' >/dev/null 2>&1 && echo ok),ok)
$(shell rm -f "$(VENV_STAMP)")
endif
endif

help:
	@echo "make run        run the embedded demo (in-process broker, SQLite, Maildirs from examples/)"
	@echo "make test       run the whole suite (installs and starts what the tests need)"
	@echo "make venv       create $(VENV) and install mailroute with its dev extras"
	@echo "make services   install Dovecot; install and start RabbitMQ and PostgreSQL if absent;"
	@echo "                set the broker's WAL size and the kernel's writeback (deploy/)"
	@echo "make lint       ruff and mypy"
	@echo "make screenshots  the browser tests, saving each page of \`mailroute web\` into $(SCREENSHOTS)"
	@echo "make bench      pipeline, parse, ingest, persist, memory benchmarks (BENCH_ARGS=\"ingest --quick\")"
	@echo "make fuzz       fuzz parse and route for FUZZ_SECONDS (atheris; else a Hypothesis loop)"
	@echo "make soak       the SIGKILL fault test at SOAK_MESSAGES messages, SOAK_KILLS kills per worker kind"
	@echo "make clean      remove caches and the demo's state; make distclean also removes $(VENV)"

venv: $(VENV_STAMP)

# Re-installs whenever pyproject.toml is newer than the stamp (or the stamp is missing).
$(VENV_STAMP): pyproject.toml
	@if [ -e "$(VENV_PY)" ] && ! "$(VENV_PY)" -c \
	        'import sys, pip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	    echo "venv: $(VENV) is unusable (no Python 3.11+ with pip in it); recreating it"; \
	    rm -rf "$(VENV)"; \
	fi
	@if [ ! -x "$(VENV_PY)" ]; then \
	    command -v "$(PYTHON)" >/dev/null || { echo "venv: $(PYTHON) not found" >&2; exit 1; }; \
	    "$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	        echo "venv: mailroute needs Python 3.11 or newer; $(PYTHON) is $$("$(PYTHON)" -V 2>&1)" >&2; \
	        exit 1; }; \
	    if ! "$(PYTHON)" -c 'import ensurepip, venv' 2>/dev/null; then \
	        command -v apt-get >/dev/null || { \
	            echo "venv: $(PYTHON) cannot create virtual environments (no ensurepip)" >&2; exit 1; }; \
	        pyver=$$("$(PYTHON)" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")'); \
	        echo "venv: installing python3-venv and python$$pyver-venv (Debian splits venv out)"; \
	        export DEBIAN_FRONTEND=noninteractive; \
	        apt-get update -q; \
	        apt-get install -y -q python3-venv "python$$pyver-venv"; \
	    fi; \
	    echo "venv: creating $(VENV) with $$("$(PYTHON)" -V 2>&1)"; \
	    "$(PYTHON)" -m venv "$(VENV)"; \
	fi
	@echo "venv: installing mailroute and its dev extras into $(VENV)"
	@"$(VENV_PY)" -m pip install --quiet -e '.[dev]'
	@touch "$(VENV_STAMP)"

# The demo needs no services.  Its Maildirs are copied once, so the mailroute run moves or
# deletes the copies, never the examples; `make clean` starts the demo over.  git keeps no
# empty folders, so the copy gets its cur/ (and tmp/) here.
run: venv
	@if [ ! -d "$(DEMO_DIR)" ]; then \
	    mkdir -p "$(DEMO_DIR)"; \
	    cp -R examples/maildir "$(DEMO_DIR)/maildir"; \
	    find "$(DEMO_DIR)/maildir" -name .gitkeep -delete; \
	    for box in "$(DEMO_DIR)"/maildir/*/; do mkdir -p "$$box"{new,cur,tmp}; done; \
	    echo "run: seeded the demo Maildirs in $(DEMO_DIR)/maildir from examples/maildir"; \
	fi
	exec "$(VENV)/bin/mailroute" --config "$(CONFIG)" run

services:
	@bash deploy/debian-setup.sh

test: venv services
	"$(VENV)/bin/pytest" -q $(PYTEST_ARGS)

# The same browser tests as in `make test`, with their PNGs also saved into $(SCREENSHOTS).
screenshots: venv services
	SCREENSHOT_DIR="$(abspath $(SCREENSHOTS))" "$(VENV)/bin/pytest" -q tests/browser $(PYTEST_ARGS)

lint: venv
	@paths=""; \
	for dir in $(LINT_PATHS); do \
	    if [ -n "$$(find "$$dir" -name '*.py' -print -quit 2>/dev/null)" ]; then \
	        paths="$$paths $$dir"; \
	    fi; \
	done; \
	[ -n "$$paths" ] || { echo "lint: no Python files in $(LINT_PATHS)"; exit 0; }; \
	status=0; \
	echo "ruff check$$paths"; "$(VENV)/bin/ruff" check $$paths || status=1; \
	echo "mypy$$paths"; "$(VENV)/bin/mypy" $$paths || status=1; \
	exit $$status

# The ingest benchmark measures fetchmail and mbsync (Debian's isync) as peers.
bench: venv services
	@command -v fetchmail >/dev/null && command -v mbsync >/dev/null || { \
	    echo "bench: installing the ingest benchmark's peers, fetchmail and isync (mbsync)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -q && apt-get install -y -q fetchmail isync; }
	"$(VENV_PY)" -m bench $(BENCH_ARGS)

# atheris ships wheels for CPython 3.11 on x86-64 Linux; where it cannot be installed (no wheel,
# no clang to build one) the target falls back to the Hypothesis loop and says so.
fuzz: venv
	@"$(VENV_PY)" -m pip install --quiet -e '.[fuzz]' || \
	    echo "fuzz: atheris could not be installed; the Hypothesis loop runs instead"
	"$(VENV_PY)" -m tests.fuzz_parse --seconds "$(FUZZ_SECONDS)"

soak: venv services
	FAULT_MESSAGES="$(SOAK_MESSAGES)" FAULT_KILLS="$(SOAK_KILLS)" "$(VENV)/bin/pytest" -q -s \
	    --timeout=0 tests/faults/test_kill_workers.py -k random_sigkills $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	rm -rf "$(DEMO_DIR)" var/mailroute.db var/mailroute.db-journal var/mailroute.db-wal var/mailroute.db-shm
	rm -rf var/attachments

distclean: clean
	rm -rf "$(VENV)"
