# wgkex: `make demo` shows a real local deployment, `make test` runs the whole suite.
# Both install what they need first: Debian packages (only the missing ones,
# without recommends) and a .venv with wgkex and its test tools.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := mosquitto wireguard-go wireguard-tools iproute2 iputils-ping procps
TRIAL_JOBS ?= 2

.PHONY: all deps venv test unit demo lab-up lab-down lab-status bench typecheck clean

all: test

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: deps venv
	$(BIN)/mypy wgkex
	$(BIN)/trial --jobs=$(TRIAL_JOBS) tests

unit: venv
	$(BIN)/trial tests.unit

# `make demo KEEP=1` leaves the lab running (then `make lab-down`).
demo: deps venv
	$(BIN)/python -m wgkex.lab demo $(if $(filter-out 0,$(KEEP)),--keep)

lab-up: deps venv
	$(BIN)/python -m wgkex.lab up

lab-down: venv
	$(BIN)/python -m wgkex.lab down

lab-status: venv
	$(BIN)/python -m wgkex.lab status

bench: deps venv
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

typecheck: venv
	$(BIN)/mypy wgkex

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* twisted/plugins/dropin.cache
