"""The reattach agent (kvmhost-usb-agent.service) on the real-USB test host, driven by QMP plug/unplug.

The agent is installed through the kvmhost.usb.passthrough role's agent tasks at the start of this
module and removed through the same tasks (usb_passthrough_agent: false) at its end, so the other
modules' tests see the test host without it. One running guest serves the scenarios; each test
takes its devices away and puts every device back where the topology declares it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.testhost import TestHost
from tests.testhost.agent import UNIT, journal, set_agent, wait_journal
from tests.testhost.ansible import attach, intent_status, take_all
from tests.testhost.devices import SERIAL_ADAPTER, STICK, TWIN_A, TWIN_B
from tests.testhost.guest import hostdev_sources, kernel_address, wait_in_guest, wait_settled
from tests.testhost.replug import storm

GUEST = "agentvm"


@pytest.fixture(scope="module")
def agent(testhost: TestHost) -> Iterator[TestHost]:
    set_agent(testhost, True)
    assert testhost.ssh("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    assert testhost.ssh("systemctl", "is-active", UNIT).stdout.strip() == "active"
    try:
        yield testhost
    finally:
        set_agent(testhost, False)
        assert testhost.ssh("systemctl", "is-active", UNIT, check=False).stdout.strip() != "active"
        assert testhost.ssh("test", "-e", "/etc/systemd/system/" + UNIT, check=False).returncode != 0


@pytest.fixture(scope="module")
def vm(agent: TestHost) -> Iterator[str]:
    with agent.running_guest(GUEST) as name:
        yield name


def test_replug_of_an_attached_stick_comes_back_in_the_guest(agent: TestHost, vm: str) -> None:
    attach(agent, vm, ["46f4:0001"])
    wait_in_guest(agent, vm, "KING0001")
    old = kernel_address(agent, "KING0001")
    start = len(journal(agent))
    agent.replug("stick")
    agent.wait_usb(lambda devices: any(d["serial"] == "KING0001" and (int(d["busnum"]), int(d["devnum"])) != old for d in devices))
    seen = wait_in_guest(agent, vm, "KING0001")
    assert seen["product"] == "QEMU USB HARDDRIVE"
    new = kernel_address(agent, "KING0001")
    lines = wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (STICK, vm, new[0], new[1]))
    assert not [line for line in lines if line.startswith("failed")], lines
    assert hostdev_sources(agent, vm) == ["<source><vendor id='0x46f4'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new]
    # Unique vendor:product: the persistent hostdev names no address and needs no re-bind.
    assert hostdev_sources(agent, vm, inactive=True) == ["<source startupPolicy='optional'><vendor id='0x46f4'/><product id='0x0001'/></source>"]
    assert intent_status(agent, vm, "live") == {STICK: "attached"}
    take_all(agent, vm)


def test_replug_into_another_port_follows_the_serial(agent: TestHost, vm: str) -> None:
    attach(agent, vm, [{"vendor_id": "0627", "product_id": "0001", "serial": "TWIN-A"}])
    wait_in_guest(agent, vm, "TWIN-A")
    start = len(journal(agent))
    try:
        agent.replug("twin-a", port="6")
        agent.wait_usb(lambda devices: any(d["serial"] == "TWIN-A" and d["port"] == "1-6" for d in devices))
        wait_in_guest(agent, vm, "TWIN-A")
        new = kernel_address(agent, "TWIN-A")
        lines = wait_journal(agent, start, r"^re-bound %s in %s \(persistent, address %03d:%03d\)$" % (TWIN_A, vm, new[0], new[1]))
        assert "attached %s to %s (live, address %03d:%03d)" % (TWIN_A, vm, new[0], new[1]) in lines
        # Twins share vendor:product, so the persistent hostdev is pinned, and now to the new address.
        pinned = "<vendor id='0x0627'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new
        assert hostdev_sources(agent, vm, inactive=True) == ["<source startupPolicy='optional'>" + pinned]
        assert hostdev_sources(agent, vm) == ["<source>" + pinned]
    finally:
        agent.replug("twin-a")
        agent.wait_usb(lambda devices: any(d["serial"] == "TWIN-A" and d["port"] == "1-3" for d in devices))
    wait_in_guest(agent, vm, "TWIN-A")
    take_all(agent, vm)


def test_unplug_removes_the_stale_hostdev_and_keeps_the_intent(agent: TestHost, vm: str) -> None:
    attach(agent, vm, [TWIN_B])
    wait_in_guest(agent, vm, "TWIN-B")
    old = kernel_address(agent, "TWIN-B")
    start = len(journal(agent))
    agent.unplug("twin-b")
    try:
        wait_journal(agent, start, r"^removed stale %s from %s \(live, address %03d:%03d\); intent kept$" % (TWIN_B, vm, old[0], old[1]))
        assert hostdev_sources(agent, vm) == []
        # Persistent: kept, so the domain gets the device again at its next start or plug.
        assert len(hostdev_sources(agent, vm, inactive=True)) == 1
        assert intent_status(agent, vm, "live") == {TWIN_B: "missing"}
        assert intent_status(agent, vm, "persistent") == {TWIN_B: "missing"}
    finally:
        agent.plug("twin-b")
    wait_in_guest(agent, vm, "TWIN-B")
    assert intent_status(agent, vm, "live") == {TWIN_B: "attached"}
    take_all(agent, vm)


def test_guest_started_without_its_device_gets_it_when_plugged(agent: TestHost) -> None:
    name = "agentvm-cold"
    agent.remove_guest(name)
    agent.create_guest(name, start=False)
    try:
        attach(agent, name, [SERIAL_ADAPTER])
        agent.unplug("serial0")
        try:
            # startupPolicy='optional': libvirt starts the domain with the device absent.
            agent.ssh("virsh", "-q", "-c", "qemu:///system", "start", name)
            assert agent.ssh("virsh", "-q", "-c", "qemu:///system", "domstate", name).stdout.strip() == "running"
            assert not [device for device in agent.guest_usb(name) if device["host"] and device["host"]["attached"]]
            start = len(journal(agent))
        finally:
            agent.plug("serial0")
        seen = wait_in_guest(agent, name, "FTDI0001")
        assert seen["product"] == "QEMU USB SERIAL"
        new = kernel_address(agent, "FTDI0001")
        wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (SERIAL_ADAPTER, name, new[0], new[1]))
        assert intent_status(agent, name, "live") == {SERIAL_ADAPTER: "attached"}
    finally:
        agent.remove_guest(name)


def test_storm_of_ten_replugs_ends_attached(agent: TestHost, vm: str) -> None:
    attach(agent, vm, ["46f4:0001"])
    wait_in_guest(agent, vm, "KING0001")
    start = len(journal(agent))
    storm(agent, "stick", 10)
    new = wait_settled(agent, vm, "KING0001")
    wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (STICK, vm, new[0], new[1]))
    assert hostdev_sources(agent, vm) == ["<source><vendor id='0x46f4'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new]
    assert len(hostdev_sources(agent, vm, inactive=True)) == 1
    attached_lines = [line for line in journal(agent)[start:] if line.startswith("attached ")]
    # Debounced: far fewer passes than events.
    assert 1 <= len(attached_lines) < 10, attached_lines
    take_all(agent, vm)


def test_agent_restarted_in_the_middle_of_a_storm(agent: TestHost, vm: str) -> None:
    attach(agent, vm, ["46f4:0001"])
    wait_in_guest(agent, vm, "KING0001")
    storm(agent, "stick", 10, restart_after=5)
    new = wait_settled(agent, vm, "KING0001")
    assert agent.ssh("systemctl", "is-active", UNIT).stdout.strip() == "active"
    assert hostdev_sources(agent, vm) == ["<source><vendor id='0x46f4'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new]
    assert intent_status(agent, vm, "live") == {STICK: "attached"}
    take_all(agent, vm)
