# kvmhost.usb — `make demo` shows it work on the built-in test host, `make test` runs every tier.
# Both set up what they need on a fresh Debian 12 machine as root; re-runs skip what is there.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMPS := build/.stamps
COLLECTIONS := build/collections
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/$(COLLECTIONS)

.PHONY: all setup libvirtd libvirtd-stop collection-link demo test unit sanity lint docs docs-site publish matrix build testhost-image integration integration-host integration-crosshost molecule benchmark benchmark-converge benchmark-crosshost benchmark-replug soak clean

# The ansible-core releases besides the project venv's (2.19) that meta/runtime.yml admits (>=2.16) and that
# run on Python 3.11: `make matrix` runs sanity and the tests that depend on ansible-core on each of them.
CORE_RELEASES := 2.16 2.17 2.18
# The oldest Python the modules support on a managed host (tests/config.yml).
TARGET_PYTHON := 3.9
# Each module's unit tests (tests/unit/test_<module>.py) and the filter's. (The role tests run playbooks and take
# about two minutes a release; `make unit` runs them on the venv's release.)
MATRIX_TESTS := $(wildcard $(patsubst plugins/modules/%.py,tests/unit/test_%.py,$(wildcard plugins/modules/*.py))) \
	tests/unit/test_usb_drift_filter.py

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

# The collection's HTML documentation, built by antsibull-docs and Sphinx into build/docs-site/build/html.
docs-site: setup
	scripts/docs-site.sh

# What Galaxy, ansible-builder, antsibull-docs and antsibull-changelog check before a release (tests/publish).
publish: setup docs-site
	$(PY) -m pytest -q tests/publish

# ansible-test compiles and imports the modules with the oldest Python they support; then every older release.
matrix: setup
	KVMHOST_USB_PYTHON=$(TARGET_PYTHON) scripts/sanity.sh --test compile --test import
	@set -e; for release in $(CORE_RELEASES); do \
		echo "== ansible-core $$release: sanity"; KVMHOST_USB_CORE=$$release scripts/sanity.sh; \
		echo "== ansible-core $$release: unit tests of the modules and the filter"; \
		"$$(scripts/core-venv.sh $$release)/bin/python" -m pytest -q $(MATRIX_TESTS); \
	done

build: setup
	$(VENV)/bin/ansible-galaxy collection build --force --output-path build/dist .

# The test-host image (cached by recipe hash), built here so that its progress shows.
testhost-image: setup
	$(PY) -m tests.testhost build

# The real-USB tier: the tests on one test host, then those on the two linked test hosts (USB/IP between them); each
# part has a target of its own, which make test runs in different lanes.
CROSSHOST_TESTS := tests/integration/test_crosshost_testhost.py
integration: integration-host integration-crosshost

integration-host: setup testhost-image
	$(PY) -m pytest -q --durations=15 --ignore=$(CROSSHOST_TESTS) tests/integration

integration-crosshost: setup testhost-image
	$(PY) -m pytest -q --durations=10 $(CROSSHOST_TESTS)

# Molecule keeps its state (whether the instance was created) under ~/.ansible/tmp, keyed by the project directory's
# name alone, which every clone shares: each checkout keeps it in its own build/ (one scenario, so one directory).
molecule: setup testhost-image
	cd extensions && MOLECULE_EPHEMERAL_DIRECTORY=$(CURDIR)/build/molecule ../$(VENV)/bin/molecule test --all

benchmark: setup
	$(PY) benchmarks/usb_facts_enumeration.py
	$(PY) benchmarks/converge_guests.py

# What a converge costs on the test host (first, no-op, swap; with the linked pair, cross-host), this checkout against
# the commit before the host runtime, in one run (about 15 minutes; BENCH_CONVERGE_ARGS=--baseline none skips the baseline).
BENCH_CONVERGE_ARGS ?= --pair
benchmark-converge: setup testhost-image
	$(PY) benchmarks/converge_runtime.py $(BENCH_CONVERGE_ARGS)

# Two linked test hosts: replug latency across hosts against a host-local replug, bulk read through USB/IP.
benchmark-crosshost: setup testhost-image
	$(PY) benchmarks/crosshost_replug.py

# The reattach agent against the udev-rule peer operators run instead, on the test host (a few minutes).
benchmark-replug: setup testhost-image
	$(PY) benchmarks/replug_latency.py

# The agent over REPLUGS replugs, 6 s apart, on the test host: about 20 minutes for the default 200.
REPLUGS ?= 200
soak: setup testhost-image
	$(PY) -m tests.soak.soak_replug --replugs $(REPLUGS)

demo: setup
	$(PY) -m tests.testhost.demo

# The tiers in two lanes at once, each tier a make of its own so that its time counts what it needs (docs-site for
# publish, the image for the test hosts). Each lane keeps about one core busy: the first runs the tests on one test
# host; the second the tiers that need no test host (unit to matrix), then the linked pair and molecule. In each lane
# the first tier that fails stops that lane; make test fails when either did. The second lane's output follows the
# first's; the table of the tiers' wall times and the run's wall time comes last, after a failure too (marked).
FIRST_LANE := integration-host
SECOND_LANE := unit sanity lint docs publish matrix integration-crosshost molecule
test:
	@rm -f build/tier-times && mkdir -p build && date +%s >build/test-started
	@trap scripts/tier-table.sh EXIT; \
	scripts/timed.sh setup $(MAKE) --no-print-directory setup testhost-image && \
	scripts/lanes.sh "$(FIRST_LANE)" "$(SECOND_LANE)"

clean:
	scripts/stop-libvirtd.sh
	rm -rf build

# `make print-CORE_RELEASES` shows a variable's value (tests/publish reads the matrix so).
print-%:
	@echo $($*)
