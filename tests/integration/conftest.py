"""Fixtures for the real-USB tier: the project's test host (see docs/testhost.md).

``testhost``          the default topology, booted once per session (about 20 s warm)
``testhost_factory``  ``testhost_factory(name, topology_file)`` boots another test host
                      with a test's own topology; all are stopped at the end of the session
``guest``             a running diskless guest in ``testhost``, removed after the test (its name)

Helpers for the tests: ``tests.testhost.ansible.run_module(host, module, args)`` and
``usb_facts(host)``; on the host: ``kernel_usb_devices()``, ``wait_usb(predicate)``,
``plug/unplug/replug(device_id)``, ``create_guest(name)``, ``guest_usb(name)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from tests.testhost import TestHost
from tests.testhost.host import PYTEST_PREFIX, owned_name, remove_orphans


def pytest_sessionstart(session: pytest.Session) -> None:
    # A crashed earlier session may have left its test hosts running: they would only eat CPU.
    remove_orphans(PYTEST_PREFIX)


@pytest.fixture(scope="session")
def testhost() -> Iterator[TestHost]:
    """The test host with the default topology, shared by the session's tests.

    A test that changes the devices (unplug, replug elsewhere) puts them back as declared
    before it ends, so that the next test finds the default topology.
    """
    host = TestHost(owned_name(PYTEST_PREFIX)).start()
    try:
        yield host
    finally:
        host.remove()


@pytest.fixture(scope="session")
def testhost_factory() -> Iterator[Callable[..., TestHost]]:
    """Boot test hosts with their own topology: ``testhost_factory("name", "topology.yml")``."""
    started: list[TestHost] = []

    def start(name: str, topology_file: str, memory_mib: int = 1024) -> TestHost:
        host = TestHost(owned_name(PYTEST_PREFIX, name), topology_file, memory_mib=memory_mib)
        started.append(host)
        return host.start()

    try:
        yield start
    finally:
        for host in started:
            host.remove()


@pytest.fixture
def guest(testhost: TestHost, request: pytest.FixtureRequest) -> Iterator[str]:
    """A running diskless guest (q35, qemu-xhci, no disk) in the session's test host; yields its name."""
    with testhost.running_guest("t-" + re.sub(r"[^A-Za-z0-9]+", "-", request.node.name).strip("-")[:40]) as name:
        yield name
