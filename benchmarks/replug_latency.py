# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Replug latency with the reattach agent, against a manual converge run, on the USB test host.

* agent: the stick, attached to a running guest, is pulled out through QMP; once the agent has
  removed the stale hostdev (the guest's ``info usb`` no longer lists it), QMP ``device_add``
  plugs it back in, and the time until the guest's ``info usb`` lists it again is taken. A
  watcher on the test host polls ``info usb`` every 20 ms through libvirt and reports over SSH.
* manual: the agent stopped, the same replug, then the converge an operator runs by hand
  (``kvmhost.usb.usb_attach`` ad hoc, the role's per-domain task); the time from ``device_add``
  until the run returns with the device in the guest.

The medians are printed side by side. Timings are reported, never asserted; the exit status
says whether the device came back every time. Under TCG on a shared 2-core machine, the numbers
are for comparison within one run only.

Usage: .venv/bin/python benchmarks/replug_latency.py [--replugs 10] [--manual 3] [--name RUNNING_TEST_HOST]
"""

from __future__ import annotations

import argparse
import statistics
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.integration.agent_support import UNIT, set_agent, wait_in_guest  # noqa: E402
from tests.testhost import TestHost  # noqa: E402
from tests.testhost.ansible import run_module  # noqa: E402

GUEST = "benchvm"
PRODUCT = "QEMU USB HARDDRIVE"
WATCHER = """
import sys, time, libvirt, libvirt_qemu
domain = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
def listed():
    text = libvirt_qemu.qemuMonitorCommand(domain, "info usb", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    return sys.argv[2] in text
while listed():
    time.sleep(0.02)
print("ready", flush=True)
while not listed():
    time.sleep(0.02)
print("seen", flush=True)
"""


def agent_replug(host: TestHost, guest: str = GUEST, watch: TestHost | None = None) -> float:
    """One replug of the stick on ``host``, timed until ``guest`` (on ``watch``, default ``host``) lists it again."""
    device = host.topology.device("stick")
    watcher = subprocess.Popen(
        (watch or host).ssh_command(["python3", "-c", WATCHER, guest, PRODUCT]), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    try:
        with host.qmp() as qmp:
            qmp.unplug("stick")
            if watcher.stdout.readline().strip() != "ready":
                raise RuntimeError("the watcher stopped before the stale hostdev was removed")
            qmp.ensure_backend(device, host.run_dir)
            start = time.monotonic()
            qmp.plug(device)
        if watcher.stdout.readline().strip() != "seen":
            raise RuntimeError("the watcher stopped before the stick came back")
        return time.monotonic() - start
    finally:
        watcher.kill()
        watcher.wait()


def manual_replug(host: TestHost) -> float:
    device = host.topology.device("stick")
    with host.qmp() as qmp:
        qmp.unplug("stick")
        qmp.ensure_backend(device, host.run_dir)
        start = time.monotonic()
        qmp.plug(device)
    host.wait_usb(lambda devices: any(d["serial"] == "KING0001" for d in devices))
    result = run_module(host, "kvmhost.usb.usb_attach", {"domain": GUEST, "devices": ["46f4:0001"]})
    elapsed = time.monotonic() - start
    if result["failed"] or not result["changed"]:
        raise RuntimeError("the manual converge did not re-attach the stick: %s" % result)
    wait_in_guest(host, GUEST, "KING0001", timeout=10)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--replugs", type=int, default=10)
    parser.add_argument("--manual", type=int, default=3)
    parser.add_argument("--name", help="a running test host to use (default: boot one, stop it afterwards)")
    args = parser.parse_args()
    host = TestHost.running(args.name) if args.name else TestHost("bench-agent").start()
    try:
        set_agent(host, True)
        host.remove_guest(GUEST)
        host.create_guest(GUEST)
        result = run_module(host, "kvmhost.usb.usb_attach", {"domain": GUEST, "devices": ["46f4:0001"]})
        if result["failed"]:
            raise RuntimeError(result["msg"])
        wait_in_guest(host, GUEST, "KING0001")
        agent = []
        for number in range(args.replugs):
            agent.append(agent_replug(host))
            print("agent replug %2d: %.2f s" % (number + 1, agent[-1]), flush=True)
        wait_in_guest(host, GUEST, "KING0001")
        host.ssh("systemctl", "stop", UNIT)
        manual = []
        for number in range(args.manual):
            manual.append(manual_replug(host))
            print("manual converge %d: %.2f s" % (number + 1, manual[-1]), flush=True)
        host.ssh("systemctl", "start", UNIT)
        print()
        print("from QMP device_add to the stick in the guest's info usb (median, min-max):")
        print("  agent            %6.2f s  (%.2f-%.2f, %d replugs)" % (statistics.median(agent), min(agent), max(agent), len(agent)))
        print("  manual converge  %6.2f s  (%.2f-%.2f, %d runs of usb_attach ad hoc)" % (statistics.median(manual), min(manual), max(manual), len(manual)))
        print("  ratio            %6.1fx" % (statistics.median(manual) / statistics.median(agent)))
    finally:
        host.remove_guest(GUEST)
        if not args.name:
            host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
