# capsule: `make run` sets everything up and starts the server;
# `make test` sets everything up and runs the tests.

PYTHON ?= python3
VENV ?= .venv
IMAGE ?= capsule-runtime:latest
LISTEN ?= tcp:3001:interface=127.0.0.1
ARGS ?=

BIN := $(VENV)/bin

.PHONY: setup image run test unit bench clean

setup: $(VENV)/.installed www/node_modules/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, where twistd finds
	# twisted/plugins/capsule_plugin.py
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $@

www/node_modules/.installed: www/package.json www/package-lock.json
	cd www && npm ci --no-audit --no-fund --loglevel=error
	touch $@

image:
	bash docker/build-image.sh $(IMAGE)

run: setup image
	$(BIN)/twistd -n capsule --listen $(LISTEN) --image $(IMAGE) $(ARGS)

test: setup image
	CAPSULE_TEST_IMAGE=$(IMAGE) $(BIN)/python -m pytest tests $(ARGS)

unit: setup
	$(BIN)/python -m pytest tests --ignore=tests/integration $(ARGS)

# ARGS=--quick for a reduced run; bench/bench.py --help lists the options.
bench: setup image
	$(BIN)/python bench/bench.py --image $(IMAGE) $(ARGS)

clean:
	rm -rf $(VENV) www/node_modules twisted/plugins/dropin.cache
