# The two quick-start commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup browser node haproxy postgres serve demo test lint bench clean
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(PIP) -e '.[dev]'

serve: setup
	$(BIN)/fedrelay serve

demo: setup
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/fedrelay demo

# The dashboard tests drive a real headless Chromium: Debian's package
# (Playwright's own browser download does not work offline).
browser:
	@command -v chromium >/dev/null || { \
		echo "installing chromium (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

# Some tests drive Node clients (a plain ws client, the seed system's frontend, fedrelay.js):
# Node and npm from apt-get when missing, then the npm package ws as tests/node's lock pins it.
NODE_DEPS := tests/node/node_modules/.package-lock.json
node: $(NODE_DEPS)

$(NODE_DEPS): tests/node/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "installing nodejs and npm (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm >/dev/null; }
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error

# docker-compose.yml's cluster profile puts HAProxy in front of the relays; a test runs its
# configuration (deploy/haproxy.cfg) with Debian's haproxy in front of real relay processes.
haproxy:
	@command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || { \
		echo "installing haproxy (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq haproxy >/dev/null; }

# The PostgreSQL tests and the bench start PostgreSQL servers of their own (own data directory and
# port, never the machine's server) from Debian's binaries, which live in
# /usr/lib/postgresql/<version>/bin, not on PATH.
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
		echo "installing postgresql (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq postgresql >/dev/null; }

test: setup browser node haproxy postgres
	FLWR_TELEMETRY_ENABLED=0 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: setup postgres
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/node/node_modules
