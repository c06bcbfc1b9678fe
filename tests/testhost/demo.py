"""`make demo`: the collection at work on the project's USB test host, no USB hardware needed.

Each step is a function taking the Demo; STEPS lists them in order. To extend the demo,
write a step and add it to STEPS.
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any, Callable

import yaml

from tests.lib.playbook import task_result

from . import image
from .agent import journal
from .ansible import play, run_module, run_playbook
from .guest import host_path, kernel_address, wait_in_guest
from .host import TestHost, TestHostError
from .paths import BUILD_DIR, REPO

GUESTS = ("demo-a", "demo-b")
STICK = "46f4:0001:KING0001"
MOUSE = "0627:0001:TWIN-A"
HOSTDEV = re.compile(r"<hostdev .*?</hostdev>")
COLUMNS = ("ID", "Dev_type", "Model", "Addr", "Vendor_device_id", "Host", "Guest")


class Demo:
    """What the steps share: the booted test host and the last device list."""

    def __init__(self) -> None:
        self.host = TestHost("demo")
        self.devices: list[dict[str, Any]] = []
        # The declared inventory: the test host's with usb_passthrough added, in a directory of the run.
        self.declared: dict[str, Any] = {}
        self.inventory_dir = os.path.join(self.host.run_dir, "declared")


def build_image(demo: Demo) -> None:
    """Build the test-host image: Debian 12 with kernel, udev, libvirt, QEMU (cached after the first run)."""
    image.build_image()


def boot_test_host(demo: Demo) -> None:
    """Boot the test host under QEMU with its USB devices: a stick, a tablet, two identical mice, a hub."""
    demo.host.start()
    os.makedirs(demo.inventory_dir, exist_ok=True)
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


def converge_two_guests(demo: Demo) -> None:
    """Declare two running guests in an inventory (demo-a: the stick, demo-b: a mouse), converge them with playbooks/converge.yml."""
    for name in GUESTS:
        demo.host.remove_guest(name)
        demo.host.create_guest(name)
    converge(demo, {"demo-a": [STICK], "demo-b": [MOUSE]})
    show_guests(demo, "info usb of each guest")


def swap_and_converge(demo: Demo) -> None:
    """Swap the declaration and converge again: each guest gets the other's device, no steal needed, every detach before any attach."""
    show_guests(demo, "before")
    converge(demo, {"demo-a": [MOUSE], "demo-b": [STICK]})
    show_guests(demo, "after")


def replug_with_agent(demo: Demo) -> None:
    """Replug the stick (QMP on the outer QEMU): the reattach agent that converge.yml installed gives it back to demo-b."""
    old = kernel_address(demo.host, "KING0001")
    lines = len(journal(demo.host))
    demo.host.replug("stick")
    demo.host.wait_usb(lambda devices: any(d["serial"] == "KING0001" and (int(d["busnum"]), int(d["devnum"])) != old for d in devices))
    print("  the stick was at %03d:%03d, is at %03d:%03d after the replug" % (old + kernel_address(demo.host, "KING0001")))
    wait_in_guest(demo.host, "demo-b", "KING0001")
    for line in journal(demo.host)[lines:]:
        print("  agent: " + line)
    show_guests(demo, "after the replug")


def converge(demo: Demo, declaration: dict[str, list[str]]) -> None:
    demo.declared = {"usb_passthrough": {name: {"devices": devices} for name, devices in declaration.items()}}
    print("  inventory: " + yaml.safe_dump(demo.declared, default_flow_style=None).strip().replace("\n", "\n  "))
    # -v: the module's result, whose actions are in the order they ran, across the domains.
    process = play(demo.host, "converge.yml", demo.inventory_dir, demo.declared, "-v")
    if process.returncode != 0:
        raise TestHostError("playbooks/converge.yml failed:\n%s" % process.stdout[-3000:])
    result = task_result(process, "kvmhost.usb.passthrough : Converge the declared USB devices of the host")
    for action in result["actions"]:
        print("  " + HOSTDEV.sub(hostdev_summary, action))
    print("  converge.yml: changed=%d failed=%d" % (process.changed, process.failed))


def hostdev_summary(match: re.Match) -> str:
    """A hostdev's XML in an action, shortened to what it names: vendor:product and the address it is pinned to."""
    hostdev = match.group(0)
    vendor, product = (re.search(r'<%s id="0x(\w+)"' % tag, hostdev).group(1) for tag in ("vendor", "product"))
    address = re.search(r'<address bus="(\d+)" device="(\d+)"', hostdev)
    return "hostdev %s:%s%s" % (vendor, product, " at %03d:%03d" % tuple(map(int, address.groups())) if address else "")


def show_guests(demo: Demo, title: str) -> None:
    print("  %s:" % title)
    for name in GUESTS:
        for device in demo.host.guest_usb(name):
            print("    %s: bus %s port %s speed %s: %s, host device %s" % (
                name, device["bus"], device["port"], device["speed"], device["product"], host_path(device)))


def write_report(demo: Demo) -> None:
    """Write the fleet's USB report with playbooks/report.yml from the declared inventory: one self-contained HTML page."""
    path = os.path.join(BUILD_DIR, "usb-report.html")
    process = play(demo.host, "report.yml", demo.inventory_dir, demo.declared, "-e", "usb_report_path=%s" % path)
    if process.returncode != 0:
        raise TestHostError("playbooks/report.yml failed:\n%s" % process.stdout[-3000:])
    print("  USB report: %s (file://%s)" % (path, path))


def playbook(demo: Demo, name: str, extra_vars: dict[str, Any]) -> None:
    process = run_playbook(demo.host, os.path.join(REPO, "playbooks", name), extra_vars)
    recap = process.stdout[process.stdout.rfind("PLAY RECAP"):].strip()
    if process.returncode != 0:
        raise TestHostError("playbooks/%s failed:\n%s" % (name, process.stdout[-3000:]))
    print("  " + recap.splitlines()[-1].strip())


STEPS: list[Callable[[Demo], None]] = [
    build_image, boot_test_host, enable_host, list_usb_devices, converge_two_guests, swap_and_converge, replug_with_agent, write_report,
]


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
    except (TestHostError, AssertionError, TimeoutError, KeyboardInterrupt) as error:
        print("demo failed: %s" % (error or "interrupted"), file=sys.stderr)
        return 1
    finally:
        print("\n== Shutting the test host down", flush=True)
        demo.host.stop()
    print("\nDone in %.0f s: %d USB devices seen through kvmhost.usb, no USB hardware used." % (time.monotonic() - started, len(demo.devices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
