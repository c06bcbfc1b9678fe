# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Replug latency and survival of the reattach agent against its peer, on the USB test host (``make benchmark-replug``).

The peer is what operators run today instead of an agent, the usb-libvirt-hotplug kind of script: a udev
rule (/etc/udev/rules.d/90-usb-libvirt-hotplug.rules) on ``add`` and ``remove`` of a usb_device with the
declared vendor and product runs a small script that calls ``virsh attach-device`` (or ``detach-device``)
with a hostdev naming the device by vendor and product. Only one of the two runs at a time: the agent is
stopped while the rule is installed, and the rule removed while the agent runs.

* latency: the stick, attached to a running guest, is replugged through QMP (``timed_replug``: pulled out,
  plugged back in once the stale hostdev is gone) and the time from ``device_add`` until the guest's
  ``info usb`` lists it again is taken, alternately with the agent and with the peer, by the same watcher.
* survival: with each of them, a replug into another port, a replug of one of two identical devices
  (0627:0001, told apart by their serials) and a storm of 10 quick replugs; survived when the guest holds
  the device at the address the kernel gave it at last, with no stale hostdev beside it.

Timings are printed, never asserted; the exit status says whether the agent brought the device back every
time. Under TCG on a shared 2-core machine, the numbers are for comparison within one run only.

Usage: .venv/bin/python benchmarks/replug_latency.py [--replugs 10] [--name RUNNING_TEST_HOST]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.testhost import TestHost, guest  # noqa: E402
from tests.testhost.agent import UNIT, journal, set_agent, wait_journal  # noqa: E402
from tests.testhost.ansible import run_module  # noqa: E402
from tests.testhost.guest import wait_in_guest, wait_settled  # noqa: E402
from tests.testhost.host import owned_name  # noqa: E402
from tests.testhost.replug import storm, timed_replug  # noqa: E402

GUEST = "benchvm"
STICK = {"device": "stick", "serial": "KING0001", "product": "QEMU USB HARDDRIVE", "vendor_id": "46f4", "product_id": "0001"}
TWIN = {"device": "twin-a", "serial": "TWIN-A", "product": "QEMU USB Mouse", "vendor_id": "0627", "product_id": "0001"}
PEER = "/usr/local/sbin/usb-libvirt-hotplug"
RULES = "/etc/udev/rules.d/90-usb-libvirt-hotplug.rules"
PEER_SCRIPT = """#!/bin/sh
# usb-libvirt-hotplug DOMAIN VENDOR PRODUCT, run by udev on add and remove of a USB device.
case "$ACTION" in
    add) command=attach-device ;;
    remove) command=detach-device ;;
    *) exit 0 ;;
esac
virsh -c qemu:///system "$command" "$1" /dev/stdin 2>&1 <<END | logger -t usb-libvirt-hotplug
<hostdev mode='subsystem' type='usb'><source><vendor id='0x$2'/><product id='0x$3'/></source></hostdev>
END
"""
RULE = 'ACTION=="%s", SUBSYSTEM=="usb", ENV{DEVTYPE}=="usb_device", ENV{PRODUCT}=="%x/%x/*", RUN+="%s %s %s %s"\n'


def use_peer(host: TestHost, device: dict) -> None:
    """Stop the agent and install the peer's rule for the device's vendor and product."""
    host.ssh("systemctl", "stop", UNIT)
    vendor, product = int(device["vendor_id"], 16), int(device["product_id"], 16)
    rules = "".join(RULE % (action, vendor, product, PEER, GUEST, device["vendor_id"], device["product_id"]) for action in ("add", "remove"))
    host.ssh("tee", RULES, input=rules)
    host.ssh("udevadm", "control", "--reload")


def use_agent(host: TestHost) -> None:
    """Remove the peer's rule and start the agent; returns once it watches udev."""
    host.ssh("rm", "-f", RULES)
    host.ssh("udevadm", "control", "--reload")
    if host.ssh("systemctl", "is-active", UNIT, check=False).stdout.strip() == "active":
        return
    start = len(journal(host))
    host.ssh("systemctl", "start", UNIT)
    wait_journal(host, start, r"^watching USB devices", timeout=60)
    # Its first pass follows at once: out of the way of the next replug's timing.
    time.sleep(3)


def peer_errors(host: TestHost, since: str) -> list[str]:
    lines = host.ssh("journalctl", "-t", "usb-libvirt-hotplug", "-o", "cat", "--no-pager", "--since", since).stdout.splitlines()
    return [line for line in lines if line.startswith("error:") and "Failed to" not in line]


def in_guest(host: TestHost, device: dict, settle: bool = False) -> str:
    """"yes" when the guest holds the device at its current address and no other hostdev; else why not."""
    try:
        if settle:
            wait_settled(host, GUEST, device["serial"], timeout=60)
        else:
            wait_in_guest(host, GUEST, device["serial"], timeout=30)
    except AssertionError:
        return "no"
    hostdevs = guest.hostdev_sources(host, GUEST)
    return "yes" if len(hostdevs) == 1 else "no (%d hostdevs)" % len(hostdevs)


def prepare(host: TestHost, device: dict) -> None:
    """The device alone attached to the guest (its intent recorded), the agent running."""
    use_agent(host)
    selector = {key: device[key] for key in ("vendor_id", "product_id", "serial")}
    result = run_module(host, "kvmhost.usb.usb_attach", {"domain": GUEST, "devices": [selector], "exclusive": True})
    if result["failed"]:
        raise RuntimeError(result["msg"])
    wait_in_guest(host, GUEST, device["serial"])


def survival(host: TestHost, who: str, case: str) -> str:
    device = TWIN if case == "identical devices" else STICK
    prepare(host, device)
    if who == "peer":
        use_peer(host, device)
    since = host.ssh("date", "+%Y-%m-%d %H:%M:%S").stdout.strip()
    if case == "storm of 10 replugs":
        storm(host, device["device"], 10)
        survived = in_guest(host, device, settle=True)
    else:
        port = "6" if case == "another port" else None
        timed_replug(host, GUEST, device["device"], device["product"], port=port, timeout=30)
        survived = in_guest(host, device)
    errors = peer_errors(host, since) if who == "peer" else []
    if case == "another port":
        # Back where the topology declares it, for the next case.
        use_agent(host)
        host.replug(device["device"])
        port = host.topology.linux_port(device["device"])
        host.wait_usb(lambda devices: any(d["serial"] == device["serial"] and d["port"] == port for d in devices))
    return survived + (": " + errors[-1] if survived != "yes" and errors else "")


def median_range(times: list[float]) -> str:
    return "%6.2f s  (%.2f-%.2f, %d replugs)" % (statistics.median(times), min(times), max(times), len(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--replugs", type=int, default=10, help="replugs with each of the agent and the peer (default: %(default)s)")
    parser.add_argument("--name", help="a running test host to use (default: boot one, stop it afterwards)")
    args = parser.parse_args()
    host = TestHost.running(args.name) if args.name else TestHost(owned_name("bench-replug")).start()
    failures = []
    try:
        set_agent(host, True)
        host.ssh("tee", PEER, input=PEER_SCRIPT)
        host.ssh("chmod", "755", PEER)
        with host.running_guest(GUEST):
            prepare(host, STICK)
            times = {"agent": [], "peer": []}
            for number in range(1, args.replugs + 1):
                for who in ("agent", "peer"):
                    if who == "agent":
                        use_agent(host)
                    else:
                        use_peer(host, STICK)
                    elapsed = timed_replug(host, GUEST, "stick", STICK["product"])
                    if elapsed is None:
                        if who == "agent":
                            failures.append("agent replug %d: the stick did not come back" % number)
                        use_agent(host)
                        wait_in_guest(host, GUEST, STICK["serial"])
                    else:
                        times[who].append(elapsed)
                    print("%s replug %2d: %s" % (who, number, "%.2f s" % elapsed if elapsed is not None else "not back"), flush=True)
            table = []
            for case in ("another port", "identical devices", "storm of 10 replugs"):
                row = [case] + [survival(host, who, case) for who in ("agent", "peer")]
                print("%s: agent %s, peer %s" % tuple(row), flush=True)
                if row[1] != "yes":
                    failures.append("the agent did not survive: %s" % case)
                table.append(row)
        if args.name:
            use_agent(host)
            set_agent(host, False)
            host.ssh("rm", "-f", PEER)
    finally:
        if not args.name:
            host.remove()
    print()
    print("from QMP device_add to the stick back in the guest's info usb (median, min-max):")
    for who in ("agent", "peer"):
        if times[who]:
            print("  %-6s %s" % (who, median_range(times[who])))
    if times["agent"] and times["peer"]:
        print("  agent/peer  %.2f" % (statistics.median(times["agent"]) / statistics.median(times["peer"])))
    print()
    print("survived (the guest holds the device at its new address, no stale hostdev):")
    print("  %-22s %-5s %s" % ("", "agent", "peer"))
    for case, agent, peer in table:
        print("  %-22s %-5s %s" % (case, agent, peer))
    for failure in failures:
        print("FAILED: " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
