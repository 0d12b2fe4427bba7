# Two commands do everything on a fresh machine:
#   make demo   set up (venv, packages, data, Redis) and run the end-to-end demo
#   make test   set up and run lint, type checks, stub check and the test suite
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TWOTOWER_DATA_DIR ?= $(CURDIR)/.cache/data
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint protos check-protos redis promtool data clean deploy-check smoke

setup: $(STAMP) data redis promtool

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[train,dev,ray]'
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python -c "from pathlib import Path; import os; from offline.datasets import fetch_recbole_wheel; print('data:', fetch_recbole_wheel(Path(os.environ['TWOTOWER_DATA_DIR'])))"

# The machine normally runs Redis on 127.0.0.1:6379; start one if none answers.
# The tests also need the redis-server binary (they start throwaway servers).
redis:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
	@if $(BIN)/python -c "import redis,sys; redis.Redis(port=6379, socket_timeout=1).ping()" 2>/dev/null; then \
	  echo "redis: running on 127.0.0.1:6379"; \
	else \
	  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no; \
	  for i in $$(seq 50); do $(BIN)/python -c "import redis; redis.Redis(port=6379).ping()" 2>/dev/null && break; sleep 0.1; done; \
	  echo "redis: started on 127.0.0.1:6379"; \
	fi

# promtool validates deploy/prometheus (config, rules, the alerts' unit tests); PyPI has none,
# Debian's prometheus package ships it (the daemon is not started).
promtool:
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)

protos: $(STAMP)
	$(BIN)/python -m online.protogen

check-protos: $(STAMP)
	$(BIN)/python -m online.protogen --check

lint: $(STAMP)
	$(BIN)/ruff check towers offline online bench twotower tests
	$(BIN)/mypy

demo: setup
	$(BIN)/twotower demo

test: setup lint check-protos
	$(BIN)/pytest -q -ra

# deploy/: hadolint on each Dockerfile, kustomize + kubernetes-validate on each overlay, the
# compose file against the compose spec, and their commands against the real CLI (offline).
deploy-check: $(STAMP)
	$(BIN)/pytest -q tests/test_deploy.py

# The deployment's commands as plain processes: compose.yaml's Redis, jobs and `serve --workers 2`
# (TLS, Redis, /metrics), scraped, called, a worker killed, then SIGTERM (tests/test_smoke.py).
smoke: $(STAMP) redis
	$(BIN)/pytest -q tests/test_smoke.py

clean:
	rm -rf $(VENV) .cache
