# Hackboot Cloud — the two commands: `make up` and `make test`.
SHELL := /bin/bash
STATE_DIR ?= var
IMAGES_DIR := $(STATE_DIR)/images/builtin
PYTEST_ARGS ?=

.PHONY: up test deps images images-tiny lint bench-smoke clean

# As root, the local host also carries the VPC data plane and the load balancers (they live in network
# namespaces, which need root); otherwise instances get only their management NIC. HACKBOOT_AGENT_EXTENSIONS set by the caller wins.
comma := ,
UP_EXTENSIONS := hackboot.volumes.agent$(if $(filter 0,$(shell id -u)),$(comma)hackboot.network.agent$(comma)hackboot.loadbalancers.agent)

up: deps images
	HACKBOOT_AGENT_EXTENSIONS="$${HACKBOOT_AGENT_EXTENSIONS:-$(UP_EXTENSIONS)}" \
	  .venv/bin/hackboot serve --state-dir $(STATE_DIR)

# Tests reuse the guest images `make up` builds (one cache, one build).
# and, once every test has run, remove the hb- namespaces the run made that a failed test left behind.
TEST_ENV := HACKBOOT_IMAGE_CACHE=$(abspath $(IMAGES_DIR)) HACKBOOT_TEST_IMAGE_DIR=$(abspath $(IMAGES_DIR)) \
            HACKBOOT_TEST_REMOVE_NAMESPACES=1

test: deps images-tiny
	$(TEST_ENV) .venv/bin/python -m pytest -n 2 --dist loadgroup -q $(PYTEST_ARGS)

deps:
	@./scripts/install-deps.sh

# Guest images are built locally from Debian packages, once, then cached.
images: deps
	.venv/bin/python -m hackboot.images.builder all --out $(IMAGES_DIR)

images-tiny: deps
	.venv/bin/python -m hackboot.images.builder tiny --out $(IMAGES_DIR)

lint: deps
	.venv/bin/ruff check src tests bench
	.venv/bin/mypy  # strict, on src/hackboot (pyproject.toml [tool.mypy])

bench-smoke: deps images-tiny
	for b in bench/*.py; do .venv/bin/python $$b --smoke || exit 1; done

clean:
	rm -rf .venv $(STATE_DIR)
