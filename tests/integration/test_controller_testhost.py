"""qemu_usb_controller on the real-USB test host: running nested guests restarted onto another controller.

The default topology (tests/testhost/topologies/default.yml) has the stick 46f4:0001 (serial
KING0001) at 2-1, attached to the test host at SuperSpeed, and the FTDI serial adapter 0403:6001
(FTDI0001) behind a hub at 1-5.1, at full speed. Each test removes its guests, which gives the
devices back to the test host.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from tests.testhost import TestHost
from tests.testhost.ansible import RESULT_LINE, environment, run_module, tool
from tests.testhost.devices import SERIAL_ADAPTER, STICK


def controller(host: TestHost, args: dict[str, Any], check: bool = False) -> tuple[dict[str, Any], str]:
    """The module's result and its warnings (the ad-hoc command prints those on stderr), whitespace folded."""
    command = [tool("ansible"), "-i", host.inventory, "testhost", "-m", "kvmhost.usb.qemu_usb_controller", "-a", json.dumps(args)]
    if check:
        command.append("--check")
    process = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=900, check=False)
    matches = list(RESULT_LINE.finditer(process.stdout))
    assert matches, "no result (rc %d):\n%s\n%s" % (process.returncode, process.stdout, process.stderr)
    printed = process.stdout.rsplit(matches[-1].group(0), 1)[1]
    result = json.loads(printed)
    assert matches[-1].group("status") in ("SUCCESS", "CHANGED"), result
    return result, " ".join(process.stderr.split())


def qemu_devices(host: TestHost, name: str, path: str) -> dict[str, str]:
    """QOM children of ``path`` in the guest's QEMU: name -> type."""
    command = json.dumps({"execute": "qom-list", "arguments": {"path": path}})
    reply = json.loads(host.ssh("virsh", "-q", "-c", "qemu:///system", "qemu-monitor-command", name, command).stdout)
    return dict((item["name"], item["type"].removeprefix("child<").removesuffix(">")) for item in reply["return"] if item["type"].startswith("child<"))


def stick_reads(host: TestHost) -> int:
    """Read requests the test host's QEMU has served from the stick's image."""
    with host.qmp() as qmp:
        stats = qmp.execute("query-blockstats")
    return next(entry["stats"]["rd_operations"] for entry in stats if entry.get("node-name") == "stick-backend")


def usb_speed(host: TestHost, name: str, product: str) -> float | None:
    for device in host.guest_usb(name):
        if device["product"] == product:
            return device["speed"]
    return None


def test_restart_puts_a_running_guest_on_ehci_and_its_stick_still_works(testhost: TestHost, guest: str) -> None:
    attached = run_module(testhost, "kvmhost.usb.usb_attach", {"domain": guest, "devices": [STICK]})
    assert attached["changed"] is True and not attached["failed"], attached
    assert usb_speed(testhost, guest, "QEMU USB HARDDRIVE") == 5000

    predicted, _warnings = controller(testhost, {"domain": guest, "model": "usb-ehci", "restart": True, "shutdown_timeout": 2}, check=True)
    assert (predicted["changed"], predicted["restarted"], predicted["restart_required"]) == (True, True, False)
    assert qemu_devices(testhost, guest, "/machine/peripheral")["usb"] == "qemu-xhci"

    # The diskless guest has no OS to answer the ACPI shutdown: it is forced off after 2 s.
    result, warnings = controller(testhost, {"domain": guest, "model": "usb-ehci", "restart": True, "shutdown_timeout": 2})
    assert result["changed"] is True
    assert result["controller"] == {"index": 0, "before": {"model": "qemu-xhci", "ports": None}, "after": {"model": "ehci", "ports": None}}
    assert (result["restarted"], result["restart_required"]) == (True, False)
    assert "USB device %s (" % STICK in warnings
    assert "is attached to the host at 5000 Mbit/s (SuperSpeed), faster than ehci carries (480 Mbit/s)" in warnings
    assert "Domain %s did not shut down within 2 s; it was forced off" % guest in warnings

    # The guest's QEMU has QEMU's plain EHCI as its USB controller, and the stick on it at high speed.
    assert qemu_devices(testhost, guest, "/machine/peripheral")["usb"] == "usb-ehci"
    assert usb_speed(testhost, guest, "QEMU USB HARDDRIVE") == 480
    # QEMU took the stick from the test host's usb-storage driver: no driver, or usbfs once claimed.
    driver = testhost.ssh("readlink", "/sys/bus/usb/devices/2-1:1.0/driver", check=False).stdout.strip()
    assert driver == "" or driver.endswith("/usbfs"), driver

    # The stick works through the EHCI controller: after a reset the guest's firmware reads its first
    # sector (the test host's kernel cannot be the reader: QEMU holds the device all along).
    before = stick_reads(testhost)
    testhost.ssh("virsh", "-q", "-c", "qemu:///system", "reset", guest)
    deadline = time.monotonic() + 60
    while stick_reads(testhost) == before and time.monotonic() < deadline:
        time.sleep(1)
    assert stick_reads(testhost) > before

    again, warnings = controller(testhost, {"domain": guest, "model": "usb-ehci", "restart": True, "shutdown_timeout": 2})
    assert (again["changed"], again["restarted"], again["restart_required"]) == (False, False, False)
    assert "forced off" not in warnings


def test_running_guest_waits_for_a_cold_start(testhost: TestHost, guest: str) -> None:
    result, _warnings = controller(testhost, {"domain": guest, "model": "ich9-ehci1"})
    assert (result["changed"], result["restarted"], result["restart_required"]) == (True, False, True)
    assert qemu_devices(testhost, guest, "/machine/peripheral")["usb"] == "qemu-xhci"
    again, _warnings = controller(testhost, {"domain": guest, "model": "ich9-ehci1"})
    assert (again["changed"], again["restart_required"]) == (False, True)


def test_full_speed_device_works_on_the_ich9_companions_and_not_on_plain_ehci(testhost: TestHost, guest: str) -> None:
    attached = run_module(testhost, "kvmhost.usb.usb_attach", {"domain": guest, "devices": [SERIAL_ADAPTER]})
    assert attached["changed"] is True and not attached["failed"], attached

    # Plain EHCI has high-speed ports only: the module says so before anything is changed.
    predicted, warnings = controller(testhost, {"domain": guest, "model": "usb-ehci"}, check=True)
    assert predicted["changed"] is True
    assert "USB device %s (" % SERIAL_ADAPTER in warnings
    assert "is attached to the host at 12 Mbit/s (full speed): QEMU's plain EHCI" in warnings

    result, warnings = controller(testhost, {"domain": guest, "model": "ich9-ehci1", "restart": True, "shutdown_timeout": 2})
    assert (result["changed"], result["restarted"], result["restart_required"]) == (True, True, False)
    assert "Mbit/s" not in warnings
    assert qemu_devices(testhost, guest, "/machine/peripheral")["usb"] == "ich9-usb-ehci1"
    assert sorted(type_ for type_ in qemu_devices(testhost, guest, "/machine/peripheral-anon").values() if "uhci" in type_) == [
        "ich9-usb-uhci1",
        "ich9-usb-uhci2",
        "ich9-usb-uhci3",
    ]
    # A UHCI companion carries the full-speed adapter.
    assert usb_speed(testhost, guest, "QEMU USB SERIAL") == 12
