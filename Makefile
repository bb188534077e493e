# capsule: `make run` sets everything up and starts the server;
# `make test` sets everything up and runs the tests.

PYTHON ?= python3
VENV ?= .venv
IMAGE ?= capsule-runtime:latest
# The agent image (Node.js, Claude Code), built FROM $(IMAGE); `none`: not built.
AGENT_IMAGE ?= capsule-agent:latest
LISTEN ?= tcp:3001:interface=127.0.0.1
# The server's name (--instance): its containers carry it, and a second
# `make run` in the same checkout needs its own (and its own LISTEN).
INSTANCE ?= default
# The profile the plain URL opens (--default-profile): shell, or claude for
# Claude Code, whose key comes from ANTHROPIC_API_KEY in make's environment:
#   ANTHROPIC_API_KEY=sk-ant-... make run DEFAULT_PROFILE=claude
DEFAULT_PROFILE ?= shell
ARGS ?=
# twistd's pid files, one per instance, out of the tree's tracked files.
RUN_DIR ?= .run
# Where `make run` writes the session image build's full output.
BUILD_LOG ?= .capsule-build.log

BIN := $(VENV)/bin

.PHONY: setup image run test unit bench clean

setup: $(VENV)/.installed www/node_modules/.installed

# An editable install: a .pth names the checkout (setup.py's package_dir),
# so that code edits take effect at the next start and twistd finds
# twisted/plugins/capsule_plugin.py on sys.path.
$(VENV)/.installed: setup.py
	@echo "capsule: installing capsule and its Python packages into $(VENV) (pip)..."
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install --quiet --upgrade pip
	@$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

www/node_modules/.installed: www/package.json www/package-lock.json
	@echo "capsule: installing the page's packages into www/node_modules (npm ci)..."
	@cd www && npm ci --no-audit --no-fund --loglevel=error >/dev/null
	@touch $@

image:
	bash docker/build-image.sh $(IMAGE) $(AGENT_IMAGE)

# Each set-up step says one line; the image build's own output goes to
# $(BUILD_LOG). Ctrl-C (or SIGTERM to twistd or to this shell) stops capsule
# without make calling it an error: the shell passes the signal on as
# SIGTERM, waits for capsule to stop, and reports success (bash: dash would
# still print "Terminated").
run: SHELL := /bin/bash
run: setup
	@mkdir -p $(RUN_DIR)
	@if pid=$$(cat $(RUN_DIR)/$(INSTANCE).pid 2>/dev/null) && kill -0 "$$pid" 2>/dev/null; then \
	  echo "capsule: a capsule of instance $(INSTANCE) already runs from this checkout (PID $$pid, $(RUN_DIR)/$(INSTANCE).pid)."; \
	  echo "capsule: stop it, or start another one with a name and a port of its own:"; \
	  echo "capsule:   make run INSTANCE=second LISTEN=tcp:3002:interface=127.0.0.1"; \
	  exit 1; fi
	@echo "capsule: Python packages in $(VENV), the page's in www/node_modules: ready"
	@echo "capsule: session image $(IMAGE) (full build log: $(BUILD_LOG))"
	@bash -c 'set -o pipefail; bash docker/build-image.sh "$$1" "$$3" 2>&1 | tee "$$2" \
	  | grep --line-buffered "^build-image:" | sed -u "s/^build-image:/capsule: image:/"' \
	  _ $(IMAGE) $(BUILD_LOG) $(AGENT_IMAGE) \
	  || { echo "capsule: the image build failed; the end of $(BUILD_LOG):"; \
	       tail -n 25 $(BUILD_LOG); exit 1; }
	@echo "capsule: starting: twistd -n --pidfile $(RUN_DIR)/$(INSTANCE).pid capsule --instance $(INSTANCE) --listen $(LISTEN) --image $(IMAGE) --agent-image $(AGENT_IMAGE) --default-profile $(DEFAULT_PROFILE) $(ARGS)"
	@$(BIN)/twistd -n --pidfile $(RUN_DIR)/$(INSTANCE).pid capsule --instance $(INSTANCE) --listen $(LISTEN) \
	  --image $(IMAGE) --agent-image $(AGENT_IMAGE) --default-profile $(DEFAULT_PROFILE) \
	  $(ARGS) & pid=$$!; \
	  trap 'kill -TERM $$pid 2>/dev/null' INT TERM; \
	  while :; do wait $$pid; status=$$?; kill -0 $$pid 2>/dev/null || break; done; \
	  case $$status in 0|130|143) exit 0;; *) exit $$status;; esac

# The page's pure modules under Node's own test runner first, then pytest.
test: setup image
	node --test www/test/*.test.mjs
	CAPSULE_TEST_IMAGE=$(IMAGE) CAPSULE_TEST_AGENT_IMAGE=$(AGENT_IMAGE) $(BIN)/python -m pytest tests $(ARGS)

unit: setup
	$(BIN)/python -m pytest tests --ignore=tests/integration $(ARGS)

# ARGS=--quick for a reduced run, ARGS="--only browser" for one kind of
# measurement; bench/bench.py --help lists the options. The page's figures
# need Chromium (/usr/bin/chromium, or CAPSULE_CHROMIUM) for Playwright.
bench: setup image
	$(BIN)/python bench/bench.py --image $(IMAGE) $(ARGS)

clean:
	rm -rf $(VENV) www/node_modules twisted/plugins/dropin.cache $(RUN_DIR)
