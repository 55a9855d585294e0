# wgkex: `make demo` shows a real local deployment, `make test` runs the whole suite.
# Both install what they need first: Debian packages (only the missing ones,
# without recommends) and a .venv with wgkex and its test tools.

# Debian's own Python where there is one: it is what a gateway runs wgkex with, and it is
# built with PGO and LTO; a Python built from source without them (pyenv's default, first on
# PATH on some machines) made the whole herd benchmark about 15 % slower here. wgkex needs
# 3.11 or newer: an older system Python (Debian 11 has 3.9) leaves python3 from PATH.
ifndef PYTHON
PYTHON := $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            && echo /usr/bin/python3 || echo python3)
endif
VENV := .venv
BIN := $(VENV)/bin
APT_PACKAGES := mosquitto wireguard-go wireguard-tools iproute2 iputils-ping procps
# The kernel VM test (tests/kernel): QEMU, busybox for its initramfs, modprobe/depmod.
APT_PACKAGES += qemu-system-x86 busybox-static kmod
TRIAL_JOBS ?= 2
# Heavy test packages run after the main suite in one trial process: they would
# otherwise start once per trial worker and starve the timing-sensitive tests of CPU.
HEAVY_TESTS := tests.cluster tests.kernel
MAIN_TESTS = $(filter-out $(HEAVY_TESTS) tests.support,$(subst /,.,$(patsubst %/__init__.py,%,$(wildcard tests/*/__init__.py))))

# What mypy (strict, setup.cfg) checks.
TYPED = wgkex tests bench

.PHONY: all deps venv test test-tools browser unit demo lab-up lab-down lab-status bench typecheck clean

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
	  case " $$missing " in *" rabbitmq-server "*) \
	    $$SUDO systemctl disable --now rabbitmq-server >/dev/null 2>&1 || true;; esac; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# The cluster suite (tests/cluster) runs RabbitMQ nodes of its own; the distribution's
# node is stopped right after installing. Only `make test` installs it (with Erlang about
# 60 MB; a minute here).
test: APT_PACKAGES += rabbitmq-server
test: deps venv test-tools
	$(BIN)/mypy $(TYPED)
	$(BIN)/trial --jobs=$(TRIAL_JOBS) $(MAIN_TESTS)
	$(BIN)/trial --temp-directory=_trial_temp.heavy $(HEAVY_TESTS)

# Tools only tests need: Debian's chromium (the status page's browser test) and promtool
# (the alert rules), taken from Debian's prometheus package without installing the server.
# Where they cannot be had, the tests that need them skip and say why.
PROMTOOL := .cache/promtool/promtool

test-tools: browser $(PROMTOOL)

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; else \
	    echo "chromium is missing and this is not root: the browser test will skip"; exit 0; fi; \
	  echo "installing Debian's chromium for the browser test"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends chromium >/dev/null; } || echo "chromium could not be installed: the browser test will skip"; }

$(PROMTOOL):
	@mkdir -p $(dir $@) && cd $(dir $@) && rm -f prometheus_*.deb && \
	{ apt-get download -qq prometheus >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get download -qq prometheus >/dev/null 2>&1; }; } && \
	dpkg-deb --fsys-tarfile prometheus_*.deb | tar -xO ./usr/bin/promtool > promtool.part && \
	chmod +x promtool.part && mv promtool.part promtool && rm -f prometheus_*.deb && echo "promtool extracted to $@" \
	|| { rm -f promtool.part prometheus_*.deb; echo "promtool could not be fetched (apt-get download prometheus): the rules tests will skip"; }

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
	$(BIN)/mypy $(TYPED)

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp* twisted/plugins/dropin.cache .cache
