"""usb_attach and usb_detach on the real-USB test host, with nested libvirt guests that receive the devices.

The default topology (tests/testhost/topologies/default.yml): the stick 46f4:0001 (serial
KING0001, port 2-1), the tablet and two identical mice, all 0627:0001 (1-2, TWIN-A at 1-3,
TWIN-B at 1-4), a hub at 1-5 with an FTDI serial adapter 0403:6001 at 1-5.1. Each test removes
its guests and puts every device back where it was.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.testhost import TestHost
from tests.testhost.ansible import run_module
from tests.testhost.devices import SERIAL_ADAPTER, STICK, TWIN_A, TWIN_B
from tests.testhost.guest import dumpxml, hostdev_sources


def attach(host: TestHost, args: dict, check: bool = False, diff: bool = False) -> dict:
    return run_module(host, "kvmhost.usb.usb_attach", args, check=check, diff=diff)


def detach(host: TestHost, args: dict, check: bool = False) -> dict:
    return run_module(host, "kvmhost.usb.usb_detach", args, check=check)


def products(host: TestHost, guest: str) -> list[str]:
    return sorted(device["product"] for device in host.guest_usb(guest))


def bound_to(device: dict) -> tuple[int, int]:
    """The host bus and device number the guest's QEMU holds a passed-through device by."""
    host = device["host"]
    if host.get("hostdevice"):
        bus, devnum = host["hostdevice"].rsplit("/", 2)[1:]
        return int(bus), int(devnum)
    return int(host["hostbus"]), int(host["hostaddr"])


def kernel_address(host: TestHost, serial: str) -> tuple[int, int]:
    device = host.kernel_device(serial=serial)
    assert device, serial
    return int(device["busnum"]), int(device["devnum"])


@pytest.fixture
def guests(testhost: TestHost) -> Iterator[list[str]]:
    """Names of the guests a test creates, removed at the end."""
    created: list[str] = []
    yield created
    for name in created:
        testhost.remove_guest(name)


def new_guest(host: TestHost, created: list[str], name: str, start: bool = True) -> str:
    host.remove_guest(name)
    host.create_guest(name, start=start)
    created.append(name)
    return name


def test_hot_attach_to_a_running_guest_is_seen_in_info_usb(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-hot")
    assert products(testhost, name) == []
    checked = attach(testhost, {"domain": name, "devices": ["46f4:0001"]}, check=True)
    assert checked["changed"] is True and not checked["failed"], checked
    assert products(testhost, name) == []

    result = attach(testhost, {"domain": name, "devices": ["46f4:0001"]})
    assert result["changed"] is True and not result["failed"], result
    assert result["domain"]["state"] == "running"
    assert result["devices"][0]["id"] == STICK
    assert result["devices"][0]["attached_to"] == {"live": [name], "persistent": [name]}
    assert products(testhost, name) == ["QEMU USB HARDDRIVE"]
    bus, devnum = kernel_address(testhost, "KING0001")
    assert hostdev_sources(testhost, name) == [
        "<source><vendor id='0x46f4'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % (bus, devnum)
    ]
    assert hostdev_sources(testhost, name, inactive=True) == [
        "<source startupPolicy='optional'><vendor id='0x46f4'/><product id='0x0001'/></source>"
    ]

    again = attach(testhost, {"domain": name, "devices": ["46f4:0001"]})
    assert again["changed"] is False and not again["failed"], again

    taken = detach(testhost, {"domain": name, "devices": [STICK]})
    assert taken["changed"] is True and not taken["failed"], taken
    assert products(testhost, name) == []
    assert hostdev_sources(testhost, name, inactive=True) == []


def test_cold_attach_with_auto_start(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-cold", start=False)
    result = attach(testhost, {"domain": name, "devices": [{"vendor_id": "0627", "product_id": "0001", "serial": "TWIN-A"}], "auto_start": True})
    assert result["changed"] is True and not result["failed"], result
    assert result["domain"]["state"] == "running"
    assert result["actions"][-1] == "start %s" % name
    assert products(testhost, name) == ["QEMU USB Mouse"]
    bus, devnum = kernel_address(testhost, "TWIN-A")
    # Three 0627:0001 devices on the host: the persistent hostdev needs the address.
    assert hostdev_sources(testhost, name, inactive=True) == [
        "<source startupPolicy='optional'><vendor id='0x0627'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % (bus, devnum)
    ]


def test_identical_devices_chosen_by_serial_and_by_port(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-twins")
    result = attach(
        testhost,
        {
            "domain": name,
            "devices": [
                {"vendor_id": "0627", "product_id": "0001", "serial": "TWIN-A"},
                {"vendor_id": "0627", "product_id": "0001", "port": "1-4"},
            ],
        },
    )
    assert not result["failed"], result
    assert [device["id"] for device in result["devices"]] == [TWIN_A, TWIN_B]
    assert products(testhost, name) == ["QEMU USB Mouse", "QEMU USB Mouse"]
    addresses = sorted((device["bus"], device["address"]) for device in testhost.guest_usb(name))
    assert len(addresses) == 2


def test_ambiguous_selector_fails_and_changes_nothing(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-ambiguous")
    before = dumpxml(testhost, name, inactive=True)
    result = attach(testhost, {"domain": name, "devices": ["0627:0001"]})
    assert result["failed"], result
    assert "is ambiguous: 3 devices match" in result["msg"]
    assert TWIN_A in result["msg"] and TWIN_B in result["msg"]
    assert "Add 'serial' to the selector" in result["msg"]
    assert products(testhost, name) == []
    assert dumpxml(testhost, name, inactive=True) == before


def test_one_device_one_vm_and_steal(testhost: TestHost, guests: list[str]) -> None:
    owner = new_guest(testhost, guests, "attach-owner")
    thief = new_guest(testhost, guests, "attach-thief")
    assert not attach(testhost, {"domain": owner, "devices": [STICK]})["failed"]
    refused = attach(testhost, {"domain": thief, "devices": [STICK]})
    assert refused["failed"], refused
    assert "held by domain %s (live, persistent)" % owner in refused["msg"]
    assert products(testhost, owner) == ["QEMU USB HARDDRIVE"]
    assert products(testhost, thief) == []

    moved = attach(testhost, {"domain": thief, "devices": [STICK], "steal": True})
    assert moved["changed"] is True and not moved["failed"], moved
    assert moved["devices"][0]["attached_to"] == {"live": [thief], "persistent": [thief]}
    assert products(testhost, owner) == []
    assert products(testhost, thief) == ["QEMU USB HARDDRIVE"]
    assert hostdev_sources(testhost, owner, inactive=True) == []
    assert detach(testhost, {"devices": [STICK]})["changed"] is True


def test_detach_from_whoever_holds_it(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-holder")
    assert not attach(testhost, {"domain": name, "devices": [{"serial": "TWIN-B"}]})["failed"]
    assert products(testhost, name) == ["QEMU USB Mouse"]
    result = detach(testhost, {"devices": ["1-4"]})
    assert result["changed"] is True and not result["failed"], result
    assert result["domain"] is None
    assert [domain["name"] for domain in result["domains"]] == [name]
    assert products(testhost, name) == []
    assert hostdev_sources(testhost, name) == []
    assert hostdev_sources(testhost, name, inactive=True) == []
    again = detach(testhost, {"devices": ["1-4"]})
    assert again["changed"] is False and not again["failed"], again


def test_two_concurrent_attaches_of_one_device(testhost: TestHost, guests: list[str]) -> None:
    left = new_guest(testhost, guests, "attach-left")
    right = new_guest(testhost, guests, "attach-right")
    results: dict[str, dict] = {}

    def run(name: str) -> None:
        results[name] = attach(testhost, {"domain": name, "devices": [SERIAL_ADAPTER]})

    threads = [threading.Thread(target=run, args=(name,)) for name in (left, right)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    succeeded = [name for name in (left, right) if not results[name]["failed"]]
    assert len(succeeded) == 1, results
    loser = right if succeeded == [left] else left
    assert "held by domain %s" % succeeded[0] in results[loser]["msg"]
    seen = {name: [device["product"] for device in testhost.guest_usb(name)] for name in (left, right)}
    assert sorted(len(products_seen) for products_seen in seen.values()) == [0, 1], seen
    detach(testhost, {"devices": [SERIAL_ADAPTER]})


def test_replug_then_a_run_rebinds_the_new_address(testhost: TestHost, guests: list[str]) -> None:
    name = new_guest(testhost, guests, "attach-replug")
    assert not attach(testhost, {"domain": name, "devices": [TWIN_B]})["failed"]
    assert products(testhost, name) == ["QEMU USB Mouse"]
    old = kernel_address(testhost, "TWIN-B")

    testhost.replug("twin-b")
    testhost.wait_usb(lambda devices: any(d["serial"] == "TWIN-B" and int(d["devnum"]) != old[1] for d in devices))
    new = kernel_address(testhost, "TWIN-B")
    assert new != old
    # libvirt does not follow the device: the live XML keeps the old address.
    stale = "<source><vendor id='0x0627'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % old
    assert hostdev_sources(testhost, name) == [stale]
    assert [bound_to(device) for device in testhost.guest_usb(name)] == [old]

    result = attach(testhost, {"domain": name, "devices": [TWIN_B]})
    assert result["changed"] is True and not result["failed"], result
    assert products(testhost, name) == ["QEMU USB Mouse"]
    assert [bound_to(device) for device in testhost.guest_usb(name)] == [new]
    live = "<source><vendor id='0x0627'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new
    assert hostdev_sources(testhost, name) == [live]
    persistent = "<source startupPolicy='optional'><vendor id='0x0627'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % new
    assert hostdev_sources(testhost, name, inactive=True) == [persistent]
    assert attach(testhost, {"domain": name, "devices": [TWIN_B]})["changed"] is False
