"""`make demo`: the collection at work on the project's USB test host, no USB hardware needed.

Each step is a function taking the Demo; STEPS lists them in order. To extend the demo,
write a step and add it to STEPS.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from . import image
from .ansible import run_module, run_playbook
from .host import TestHost, TestHostError
from .paths import BUILD_DIR, REPO

DEMO_GUEST = "demo-vm"
COLUMNS = ("ID", "Dev_type", "Model", "Addr", "Vendor_device_id", "Host", "Guest")


class Demo:
    """What the steps share: the booted test host and the last device list."""

    def __init__(self) -> None:
        self.host = TestHost("demo")
        self.devices: list[dict[str, Any]] = []


def build_image(demo: Demo) -> None:
    """Build the test-host image: Debian 12 with kernel, udev, libvirt, QEMU (cached after the first run)."""
    image.build_image()


def boot_test_host(demo: Demo) -> None:
    """Boot the test host under QEMU with its USB devices: a stick, a tablet, two identical mice, a hub."""
    demo.host.start()
    print("  test host up: ssh on 127.0.0.1:%s, Ansible inventory %s" % (demo.host.ssh_port, demo.host.inventory))


def enable_host(demo: Demo) -> None:
    """Enable USB passthrough on it with playbooks/enable_host.yml: packages, disable_usb in host.conf (no host agent to restart here)."""
    playbook(demo, "enable_host.yml", {"usb_host_restart_strategy": "none"})
    print("  " + demo.host.ssh("grep", "-n", "disable_usb", "/etc/yunion/host.conf").stdout.strip())


def list_usb_devices(demo: Demo) -> None:
    """List its USB devices with kvmhost.usb.usb_facts, like `climc isolated-device-list --details`."""
    result = run_module(demo.host, "kvmhost.usb.usb_facts")
    if result["failed"]:
        raise TestHostError("kvmhost.usb.usb_facts failed: %s" % result.get("msg"))
    demo.devices = result["ansible_facts"]["usb_devices"]
    print(render_table([device_row(device, "testhost") for device in demo.devices]))


def pass_stick_to_guest(demo: Demo) -> None:
    """Pass the stick to a guest with kvmhost.usb.usb_attach, show what the guest sees, take it back with usb_detach."""
    stick = {"serial": demo.host.topology.device("stick").serial}
    demo.host.remove_guest(DEMO_GUEST)
    demo.host.create_guest(DEMO_GUEST)
    try:
        module(demo, "kvmhost.usb.usb_attach", {"domain": DEMO_GUEST, "devices": [stick]})
        print("  the guest's QEMU (info usb) after usb_attach:")
        for device in demo.host.guest_usb(DEMO_GUEST):
            print("    bus %(bus)s port %(port)s speed %(speed)s: %(product)s" % device)
        module(demo, "kvmhost.usb.usb_detach", {"devices": [stick]})
        print("  after usb_detach the guest sees %d USB device(s)" % len(demo.host.guest_usb(DEMO_GUEST)))
    finally:
        demo.host.remove_guest(DEMO_GUEST)


def module(demo: Demo, name: str, args: dict[str, Any]) -> None:
    result = run_module(demo.host, name, args)
    if result["failed"]:
        raise TestHostError("%s failed: %s" % (name, result.get("msg")))
    print("  %s: %s" % (name, result["status"]))


def write_report(demo: Demo) -> None:
    """Write the fleet's USB report with playbooks/report.yml: one self-contained HTML page."""
    path = os.path.join(BUILD_DIR, "usb-report.html")
    playbook(demo, "report.yml", {"usb_report_path": path})
    print("  USB report: %s (file://%s)" % (path, path))


def playbook(demo: Demo, name: str, extra_vars: dict[str, Any]) -> None:
    process = run_playbook(demo.host, os.path.join(REPO, "playbooks", name), extra_vars)
    recap = process.stdout[process.stdout.rfind("PLAY RECAP"):].strip()
    if process.returncode != 0:
        raise TestHostError("playbooks/%s failed:\n%s" % (name, process.stdout[-3000:]))
    print("  " + recap.splitlines()[-1].strip())


STEPS: list[Callable[[Demo], None]] = [build_image, boot_test_host, enable_host, list_usb_devices, pass_stick_to_guest, write_report]


def device_row(device: dict[str, Any], host: str) -> list[str]:
    attached = device.get("attached_to") or {}
    guests = list(attached.get("live") or [])
    guests += ["%s (config)" % name for name in attached.get("persistent") or [] if name not in guests]
    return [device["id"], "USB", device["model"] or "", device["address"] or "", device["vendor_device_id"], host, ",".join(guests)]


def render_table(rows: list[list[str]]) -> str:
    """A table in climc's style: +---+ rules, | cells |."""
    widths = [max([len(column)] + [len(row[index]) for row in rows]) for index, column in enumerate(COLUMNS)]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+"

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "|" + "|".join(" %s " % cell.ljust(width) for cell, width in zip(cells, widths)) + "|"

    return "\n".join([rule, line(COLUMNS), rule] + [line(row) for row in rows] + [rule])


def main() -> int:
    demo = Demo()
    started = time.monotonic()
    try:
        for number, step in enumerate(STEPS, 1):
            print("\n== Step %d/%d: %s" % (number, len(STEPS), step.__doc__), flush=True)
            step_started = time.monotonic()
            step(demo)
            print("   (%.0f s)" % (time.monotonic() - step_started), flush=True)
    except (TestHostError, KeyboardInterrupt) as error:
        print("demo failed: %s" % (error or "interrupted"), file=sys.stderr)
        return 1
    finally:
        print("\n== Shutting the test host down", flush=True)
        demo.host.stop()
    print("\nDone in %.0f s: %d USB devices seen through kvmhost.usb, no USB hardware used." % (time.monotonic() - started, len(demo.devices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
