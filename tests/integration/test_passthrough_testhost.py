"""The host's declared USB state converged as a whole (kvmhost.usb.usb_passthrough) on the real-USB test host.

- A swap between two running guests declared in an inventory and converged by playbooks/converge.yml, watched
  by a sampler of both guests' QEMU monitors: neither device is ever seen in both guests at once.
- Identity: a guest holds the FTDI serial adapter by its serial id; a second adapter with the same vendor:product
  and the same serial is plugged in beside it, which makes both ids port-based. The guest keeps its own adapter,
  restarts with it (its persistent hostdev, written without an address while the adapter was unique, is pinned
  by address), and the facts say its intent is attached. (The twin mice would not show the restart failure: with
  the tablet beside them, a 0627:0001 hostdev is pinned by address from the start.)

Without the reattach agent (usb_passthrough_agent: false): it would re-pin by itself. Each test removes its
guests and whatever it plugged, so the next test finds the default topology.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.testhost import Device, TestHost
from tests.testhost.ansible import play, run_module, usb_facts
from tests.testhost.devices import SERIAL_ADAPTER, STICK, TWIN_A
from tests.testhost.guest import UsbSampler, host_path, hostdev_sources, virsh

ADAPTER_PORT = "1-5.1"
# Cheap serial adapters ship with one serial for the whole batch: a second one, in a free port.
NEWCOMER = Device(id="ftdi-twin", kind="serial", port="6", serial="FTDI0001")
NEWCOMER_PORT = "1-6"


def declared(domains: dict[str, list[Any]]) -> dict[str, Any]:
    return {"usb_passthrough": {name: {"devices": devices} for name, devices in domains.items()}, "usb_passthrough_agent": False}


def kernel_path(host: TestHost, port: str) -> str:
    device = host.kernel_device(port=port)
    assert device, port
    return "/dev/bus/usb/%03d/%03d" % (int(device["busnum"]), int(device["devnum"]))


def bound(devices: list[dict[str, Any]], names: dict[str, str]) -> list[str]:
    """The passed-through devices of a guest as ids (``names``: host path -> id), sorted; an unknown path as it is."""
    paths = [host_path(device) for device in devices if device["host"]]
    return sorted(names.get(path, path) for path in paths)


def seen_in_both(samples: list[tuple[str, list[str]]], moves: dict[str, tuple[str, str]]) -> list[str]:
    """The moving devices the samples prove were in two guests at once.

    The guests are asked one after the other. A device is in the guest it moves to from its attach on, and in
    the guest it leaves until its detach: found in the first at one sample and still in the second at a later
    one, it was attached before it was detached, in both guests in between. (The other order is a correct move
    that happened between two samples.)
    """
    proofs = []
    for device, (source, destination) in moves.items():
        arrived = [index for index, (guest, held) in enumerate(samples) if guest == destination and device in held]
        stayed = [index for index, (guest, held) in enumerate(samples) if guest == source and device in held]
        if arrived and stayed and arrived[0] < stayed[-1]:
            proofs.append("%s in %s at sample %d and still in %s at sample %d" % (device, destination, arrived[0], source, stayed[-1]))
    return proofs


@pytest.fixture
def pair(testhost: TestHost) -> Iterator[tuple[str, str]]:
    """Two running guests, removed after the test."""
    names = ("swap-g1", "swap-g2")
    for name in names:
        testhost.remove_guest(name)
        testhost.create_guest(name)
    try:
        yield names
    finally:
        for name in names:
            testhost.remove_guest(name)


def test_swap_between_two_running_guests_declared_in_the_inventory(testhost: TestHost, pair: tuple[str, str], tmp_path) -> None:
    g1, g2 = pair
    names = {kernel_path(testhost, "2-1"): STICK, kernel_path(testhost, "1-3"): TWIN_A}
    first = play(testhost, "converge.yml", tmp_path, declared({g1: [STICK], g2: [TWIN_A]}))
    assert (first.returncode, first.failed) == (0, 0), first.stdout
    assert bound(testhost.guest_usb(g1), names) == [STICK]
    assert bound(testhost.guest_usb(g2), names) == [TWIN_A]

    # No steal: the devices only move among declared domains.
    with UsbSampler(testhost, [g1, g2]) as sampler:
        swapped = play(testhost, "converge.yml", tmp_path, declared({g1: [TWIN_A], g2: [STICK]}))
        sampler.wait_for(2)
    assert (swapped.returncode, swapped.failed) == (0, 0), swapped.stdout
    assert bound(testhost.guest_usb(g1), names) == [TWIN_A]
    assert bound(testhost.guest_usb(g2), names) == [STICK]

    samples = [(guest, bound(devices, names)) for guest, devices in sampler.samples]
    over_time = {name: [held for guest, held in samples if guest == name] for name in pair}
    assert min(len(seen) for seen in over_time.values()) >= 5, samples
    # The sampler saw the whole run: the declaration before, the swapped one after.
    assert (over_time[g1][0], over_time[g2][0]) == ([STICK], [TWIN_A])
    assert (over_time[g1][-1], over_time[g2][-1]) == ([TWIN_A], [STICK])
    assert seen_in_both(samples, {STICK: (g1, g2), TWIN_A: (g2, g1)}) == [], samples

    held = {device["id"]: device["attached_to"] for device in usb_facts(testhost, include_hubs=False)}
    assert held[STICK] == {"live": [g2], "persistent": [g2]}
    assert held[TWIN_A] == {"live": [g1], "persistent": [g1]}

    again = play(testhost, "converge.yml", tmp_path, declared({g1: [TWIN_A], g2: [STICK]}))
    assert (again.returncode, again.failed, again.changed) == (0, 0, 0), again.stdout


@pytest.fixture
def newcomer(testhost: TestHost) -> Iterator[Device]:
    """The twin adapter, plugged in by the test; pulled out again at the end if it is in."""
    try:
        yield NEWCOMER
    finally:
        with testhost.qmp() as qmp:
            if NEWCOMER.id in qmp.usb_device_ids():
                qmp.unplug(NEWCOMER.id)
        testhost.wait_usb(lambda devices: not any(device["port"] == NEWCOMER_PORT for device in devices))


def test_a_held_device_stays_its_guests_when_a_twin_with_its_serial_arrives(testhost: TestHost, guest: str, newcomer: Device) -> None:
    attached = run_module(testhost, "kvmhost.usb.usb_attach", {"domain": guest, "devices": [SERIAL_ADAPTER]})
    assert not attached["failed"], attached
    own = kernel_path(testhost, ADAPTER_PORT)
    assert [host_path(device) for device in testhost.guest_usb(guest)] == [own]

    with testhost.qmp() as qmp:
        qmp.ensure_backend(newcomer, testhost.run_dir)
        qmp.plug(newcomer)
    testhost.wait_usb(lambda devices: any(device["port"] == NEWCOMER_PORT and device["serial"] == "FTDI0001" for device in devices))
    ids = {device["port"]: device["id"] for device in usb_facts(testhost, include_hubs=False)}
    # The id rule: one serial twice, so both ids are port-based and the recorded id names no device.
    assert (ids[ADAPTER_PORT], ids[NEWCOMER_PORT]) == ("0403:6001@" + ADAPTER_PORT, "0403:6001@" + NEWCOMER_PORT)

    converged = run_module(testhost, "kvmhost.usb.usb_passthrough", {"domains": {guest: {"devices": [SERIAL_ADAPTER]}}})
    assert not converged["failed"], converged
    assert [host_path(device) for device in testhost.guest_usb(guest)] == [own]
    # The persistent hostdev designates the guest's own adapter only: by its address.
    bus, devnum = (int(part) for part in own.rsplit("/", 2)[1:])
    [persistent] = hostdev_sources(testhost, guest, inactive=True)
    assert "<vendor id='0x0403'/><product id='0x6001'/><address bus='%d' device='%d'/>" % (bus, devnum) in persistent, persistent

    again = run_module(testhost, "kvmhost.usb.usb_attach", {"domain": guest, "devices": [SERIAL_ADAPTER]})
    assert (again["failed"], again["changed"]) == (False, False), again
    assert [host_path(device) for device in testhost.guest_usb(guest)] == [own]

    virsh(testhost, "destroy", guest)
    started = virsh(testhost, "start", guest, check=False)
    assert started.returncode == 0, started.stderr
    assert [host_path(device) for device in testhost.guest_usb(guest)] == [own]

    facts = run_module(testhost, "kvmhost.usb.usb_facts")["ansible_facts"]
    [domain] = [entry for entry in facts["usb_domains"] if entry["name"] == guest]
    assert [entry["status"] for entry in domain["live"]["intent"]] == ["attached"], domain
    assert [entry["status"] for entry in domain["persistent"]["intent"]] == ["attached"], domain
    attached_to = {device["port"]: device["attached_to"] for device in facts["usb_devices"]}
    assert attached_to[ADAPTER_PORT] == {"live": [guest], "persistent": [guest]}
    assert attached_to[NEWCOMER_PORT] == {"live": [], "persistent": []}
