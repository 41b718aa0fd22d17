# The README's two commands: `make run` and `make test`. Everything else supports them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/python/pyproject.toml $(LOCK) | sha1sum | cut -c1-12)

.PHONY: install lock env-example asyncapi transcript test lint typecheck run start stop status logs ctl ensure-nginx browser-deps js-deps ops-deps bench reliability clean

install: $(STAMP)

# Every distribution at the version requirements.lock pins (the set the dependency audit
# checks); pip and setuptools too: a new venv's own setuptools 65 carries known advisories.
$(STAMP): pyproject.toml clients/python/pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) --upgrade pip setuptools
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev]'
	$(PY) -m pip install -q -c $(LOCK) -e clients/python  # the Python client (its own dist)
	@rm -f $(VENV)/.installed-*
	@touch $@

# Re-resolve pyproject.toml's ranges to the newest releases in a fresh venv and pin them.
lock:
	rm -rf $(VENV).lock && $(PYTHON) -m venv --upgrade-deps $(VENV).lock
	$(VENV).lock/bin/pip install -q -e '.[dev]'
	{ echo "# make lock: pyproject.toml's runtime and dev dependencies, resolved and pinned."; \
	  $(VENV).lock/bin/pip freeze --all --exclude-editable | sort -f; } > $(LOCK)
	rm -rf $(VENV).lock

# .env.example from shared/settings.py (every variable, its default, its description);
# tests/docs checks the committed file is current.
env-example: install
	$(PY) -m deploy.envfile .env.example

# docs/asyncapi.json from shared/envelope.py's Structs (http_api/asyncapi.py), and the frame
# transcript in docs/protocol.md recorded from a real session (tests/e2e/test_transcript.py);
# tests fail when either differs from what the code makes now.
asyncapi: install
	$(PY) -m http_api.asyncapi docs/asyncapi.json

transcript: install
	UPDATE_TRANSCRIPT=1 $(PY) -m pytest -q -p no:cacheprovider tests/e2e/test_transcript.py

lint: install
	$(VENV)/bin/ruff check .

typecheck: install
	$(VENV)/bin/mypy

test: install lint typecheck ensure-nginx browser-deps js-deps ops-deps
	node --test clients/js/test/
	$(PY) -m pytest -q -p no:cacheprovider

# The browser tests (tests/browser) drive Debian's chromium through Playwright, and the JS
# client's tests run on node and npm: installs whichever is missing (apt-get, as root or
# with sudo).
browser-deps:
	@tests/browser/ensure-browser.sh

# tests/ops checks the rendered systemd units with systemd-analyze: installs it if missing.
ops-deps:
	@tests/ops/ensure-tools.sh

# The JS client's dev tools (typescript, publint, attw; ws, a Node WebSocket that sends a
# token) at its package-lock.json's versions: tests/js packs clients/js (tsc makes the
# types), checks the tarball with them and drives it on a real stack.
JS := clients/js
JS_STAMP := $(JS)/node_modules/.installed-$(shell cat $(JS)/package-lock.json | sha1sum | cut -c1-12)

js-deps: browser-deps $(JS_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --silent
	@touch $@

# The stack (deploy/README.md). Settings come from the environment or the command line:
# `make run NATS_CLUSTER=3`, `make start BASE_PORT=9080 VAR_DIR=/tmp/stack2`.
run: install ensure-nginx
	@$(PY) -m deploy run

start: install ensure-nginx
	@$(PY) -m deploy start

stop status logs:
	@if [ -x $(PY) ]; then $(PY) -m deploy $@; else echo "not installed: nothing running"; fi

# `make ctl ARGS='restart ws_gateway:*'`: supervisorctl on this stack.
ctl: install
	@$(PY) -m deploy ctl $(ARGS)

ensure-nginx:
	@deploy/ensure-nginx.sh

# The benchmark suite (bench/run.py, bench/RESULTS.md): never part of `make test`. It needs
# the `bench` extra (matplotlib) and, for the Node load client, `ws` from npm in bench/;
# without node it falls back to the Python load client. Options: `make bench ARGS=--quick`.
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml bench/package.json | sha1sum | cut -c1-12)

$(BENCH_STAMP): $(STAMP) pyproject.toml bench/package.json
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,bench]'
	@if command -v npm >/dev/null; then cd bench && npm install --no-audit --no-fund --no-package-lock --silent \
	  || echo "npm install failed: bench uses the Python load client"; \
	else echo "npm not found: bench uses the Python load client"; fi
	@rm -f $(VENV)/.bench-*
	@touch $@

# The hardening suite at full scale (tests/reliability, under 30 min on 2 cores), then
# docs/reliability.md from its figures. Its fast part already runs in `make test`.
RELIABILITY_FIGURES ?= var/reliability/figures.json

reliability: install ensure-nginx browser-deps
	@mkdir -p $(dir $(RELIABILITY_FIGURES))
	RELIABILITY_FULL=1 RELIABILITY_FIGURES=$(RELIABILITY_FIGURES) \
	  $(PY) -m pytest -q -p no:cacheprovider -p no:logging -rfEsxX tests/reliability; \
	  rc=$$?; $(PY) tests/reliability/report.py $(RELIABILITY_FIGURES) docs/reliability.md; exit $$rc

bench: install $(BENCH_STAMP)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache bench/node_modules $(JS)/node_modules $(JS)/types
