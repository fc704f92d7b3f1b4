# Two commands matter: `make demo` and `make test`. Both are idempotent.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STACK := $(PY) scripts/stack.py
RUN := $(STACK) run --
# Two pytest-xdist workers: much of the suite waits on Airflow, MLflow and S3 processes (on a slow
# 2-core machine: 27 min of pytest instead of 35.5). Whole modules, and the serial groups in
# tests/conftest.py, each go to one worker.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=30

.PHONY: help system-deps venv env up down status test test-unit test-integration test-dags demo airflow lint bench clean browser-deps results-screenshot

help:
	@echo "make demo    - venv, local stack, demo dataset, whole DAG once, results"
	@echo "make test    - venv, local stack, the whole test suite"
	@echo "make up|down|status - the local stack (MySQL, S3, MLflow, Airflow home)"
	@echo "make airflow - Airflow UI on http://127.0.0.1:8080 (API server, scheduler, DAG processor, triggerer)"
	@echo "make lint    - ruff check and format check"

# mysqlclient (for Airflow's MySQL provider) builds against libmariadb-dev via pkg-config.
system-deps:
	@if pkg-config --exists libmariadb 2>/dev/null || pkg-config --exists mysqlclient 2>/dev/null; then \
	  echo "[make] system packages ok (libmariadb-dev, pkg-config)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[make] installing libmariadb-dev and pkg-config with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmariadb-dev pkg-config >/dev/null; \
	else \
	  echo "[make] missing system packages; install them with:"; \
	  echo "    sudo apt-get install -y libmariadb-dev pkg-config"; exit 1; \
	fi

# Debian's chromium, driven by Playwright in the results page test (no browser download).
browser-deps:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "[make] system packages ok (chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "[make] installing chromium with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
	  echo "[make] missing chromium; install it with:"; \
	  echo "    sudo apt-get install -y chromium"; exit 1; \
	fi

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	@[ -x $(PY) ] || { echo "[make] creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "[make] installing requirements into $(VENV) (first time: a few minutes)"
	@$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(PY) -m pip install -q --no-deps -e . 2>&1 | { grep -v '^WARNING: Location' || true; }
	@$(PY) -c "import pipeline, torch, torchvision, mlflow, airflow" 
	@touch $(STAMP)
	@echo "[make] venv ready"

venv: $(STAMP)

env:
	@[ -f .env ] || { cp .env.example .env; echo "[make] created .env from .env.example"; }

up: venv env
	@$(STACK) up

down:
	@if [ -x $(PY) ]; then $(STACK) down; else echo "[make] no venv, nothing to stop"; fi

status: venv env
	@$(STACK) status

test: up browser-deps
	@echo "[make] running the test suite (unit, integration, dags) on $(TEST_WORKERS) workers"
	@$(RUN) $(PY) -m pytest $(PYTEST_PARALLEL) tests

test-unit: venv env
	@$(RUN) $(PY) -m pytest tests/unit

test-integration: up browser-deps
	@$(RUN) $(PY) -m pytest tests/integration

test-dags: up
	@$(RUN) $(PY) -m pytest tests/dags

demo: up
	@$(RUN) bash scripts/demo.sh

airflow: up
	@echo "[make] Airflow UI on http://127.0.0.1:$${AIRFLOW_API_PORT:-8080} (user/password from .env: AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD)"
	@$(STACK) airflow

# docs/img/results.png: the results page on the demo's data (run `make demo` first).
results-screenshot: up browser-deps
	@IMGPIPE_RESULTS_SCREENSHOT=docs/img/results.png $(RUN) $(PY) -m pytest -q tests/integration/test_results_page.py

lint: venv
	@$(VENV)/bin/ruff check pipeline dags plugins tests scripts bench
	@$(VENV)/bin/ruff format --check pipeline dags plugins tests scripts bench

bench: up
	@$(RUN) $(PY) bench/run_all.py

clean: down
	rm -rf .local
