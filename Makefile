# kvmhost.usb — `make demo` shows it work on the built-in test host, `make test` runs every tier.
# Both set up what they need on a fresh Debian 12 machine as root; re-runs skip what is there.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := build/.stamps
COLLECTIONS := build/collections
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/$(COLLECTIONS)

.PHONY: all setup libvirtd libvirtd-stop collection-link demo test unit sanity lint docs build testhost-image integration molecule benchmark clean

all: test

$(STAMPS)/debian: scripts/install-debian-packages.sh
	scripts/install-debian-packages.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/venv: requirements-dev.txt $(STAMPS)/debian
	test -x $(PY) || /usr/bin/python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel
	$(PY) -m pip install -q -r requirements-dev.txt
	@mkdir -p $(STAMPS) && touch $@

setup: $(STAMPS)/venv collection-link

# The unit tests and benchmarks start and stop a libvirtd of their own (socket and state in
# build/libvirt, the machine's libvirtd left alone); these start and stop it by hand, to look around.
libvirtd: $(STAMPS)/venv
	$(PY) -m tests.lib.libvirtd start

libvirtd-stop: $(STAMPS)/venv
	$(PY) -m tests.lib.libvirtd stop

collection-link:
	@mkdir -p $(COLLECTIONS)/ansible_collections/kvmhost
	@ln -sfn $(CURDIR) $(COLLECTIONS)/ansible_collections/kvmhost/usb

unit: setup
	$(PY) -m pytest -q tests/unit

sanity: setup
	scripts/sanity.sh

lint: setup
	$(VENV)/bin/ansible-lint --profile production

docs: setup
	scripts/check-docs.sh

build: setup
	$(VENV)/bin/ansible-galaxy collection build --force --output-path build/dist .

# The test-host image (cached by recipe hash), built here so that its progress shows.
testhost-image: setup
	$(PY) -m tests.testhost build

integration: setup testhost-image
	$(PY) -m pytest -q tests/integration

molecule: setup testhost-image
	cd extensions && ../$(VENV)/bin/molecule test --all

benchmark: setup
	$(PY) benchmarks/usb_facts_enumeration.py
	$(PY) benchmarks/converge_guests.py

demo: setup
	$(PY) -m tests.testhost.demo

test: setup unit sanity lint docs integration molecule

clean:
	scripts/stop-libvirtd.sh
	rm -rf build
