# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A USB device used across hosts (USB/IP between two linked test hosts), through the WireGuard tunnel and in clear
text, against the same device used locally.

* replug latency: the stick on host A is pulled out through QMP; once the guest holding it no longer
  lists it, QMP ``device_add`` plugs it back in, and the time until the guest's ``info usb`` lists it
  again is taken (tests/testhost/replug.py's watcher). Host-local: the guest runs on A itself,
  reattached by A's agent. Across hosts: the guest runs on B, declared with ``host: kvm1``, brought back
  by A's exporter, B's agent import and attach: B's agent, its import lost, watches for the stick on A's
  exporter (OP_REQ_WATCH), which tells it the moment the stick is bound again, and imports at once rather than
  at its next timed retry. Once over plain USB/IP (``usb_link_encryption: none``), once through the tunnel (the
  default). Median of ``--replugs`` each.
* bulk read: ``dd`` of the whole stick with O_DIRECT, on A directly and on B through the import
  (B's guest shut off, so the stick is a local device of B), plain and through the tunnel, median of ``--reads``
  each; the ratios of the throughputs.

Both setups are made by the kvmhost.usb.converge playbook over the two hosts. Timings are reported,
never asserted; the exit status says whether the device came back every time. Under TCG on a shared
2-core machine the figures are for comparison within one run only.

Usage: .venv/bin/python benchmarks/crosshost_replug.py [--replugs 10] [--reads 3] [--encryption none|wireguard ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.testhost import TestHost  # noqa: E402
from tests.testhost.ansible import play_fleet  # noqa: E402
from tests.testhost.guest import wait_in_guest  # noqa: E402
from tests.testhost.pair import A_NAME, B_NAME, LinkedPair  # noqa: E402
from tests.testhost.replug import timed_replug  # noqa: E402

GUEST = "benchvm"
STICK = "46f4:0001:KING0001"
SERIAL = "KING0001"
DD = r"""
import glob, re, subprocess, sys, time
disks = [path for path in glob.glob("/dev/disk/by-id/usb-*_%s-*" % sys.argv[1]) if "-part" not in path]
if not disks:
    sys.exit("no block device for " + sys.argv[1])
start = time.monotonic()
process = subprocess.run(["dd", "if=" + disks[0], "of=/dev/null", "bs=1M", "iflag=direct"], capture_output=True, text=True, check=True)
seconds = time.monotonic() - start
print(int(re.search(r"^(\d+) bytes", process.stderr, re.M).group(1)), seconds)
"""


def converge(pair: LinkedPair, directory: str, hostvars: dict) -> None:
    process = play_fleet(pair.inventory(directory, hostvars), "converge.yml")
    if process.returncode != 0:
        raise RuntimeError("converge failed:\n%s\n%s" % (process.stdout, process.stderr))


def bulk_read(host: TestHost) -> float:
    """MB/s of one O_DIRECT read of the whole stick on ``host``."""
    size, seconds = host.ssh("python3", "-", SERIAL, input=DD, timeout=600).stdout.split()
    return int(size) / float(seconds) / 1e6


def replugs(count: int, plug: TestHost, watch: TestHost, label: str) -> list[float]:
    times = []
    for number in range(count):
        seconds = timed_replug(plug, GUEST, "stick", "QEMU USB HARDDRIVE", timeout=180, watch=watch)
        if seconds is None:
            raise RuntimeError("%s replug %d: the stick did not come back into %s" % (label, number + 1, GUEST))
        times.append(seconds)
        print("%s replug %2d: %.2f s" % (label, number + 1, times[-1]), flush=True)
        wait_in_guest(watch, GUEST, SERIAL, timeout=180)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--replugs", type=int, default=10)
    parser.add_argument("--reads", type=int, default=3)
    parser.add_argument("--encryption", action="append", choices=("none", "wireguard"), help="the links to measure (default: both)")
    args = parser.parse_args()
    encryptions = args.encryption or ["none", "wireguard"]
    with LinkedPair("bench-crosshost") as pair, tempfile.TemporaryDirectory(prefix="kvmhost-bench-") as tmp:
        direct = [bulk_read(pair.a) for read in range(args.reads)]
        print("bulk read on A directly: %s MB/s" % ", ".join("%.1f" % rate for rate in direct), flush=True)

        with pair.a.running_guest(GUEST):
            converge(pair, tmp, {A_NAME: {"usb_passthrough": {GUEST: {"devices": [STICK]}}}})
            wait_in_guest(pair.a, GUEST, SERIAL, timeout=180)
            local = replugs(args.replugs, pair.a, pair.a, "host-local")
            converge(pair, tmp, {A_NAME: {"usb_passthrough": {GUEST: {"devices": []}}}})

        remote = {}
        imported = {}
        for encryption in encryptions:
            label = "across hosts, %s" % ("plain USB/IP" if encryption == "none" else "tunnel")
            link = {"usb_link_encryption": encryption}
            pair.b.create_guest(GUEST, start=False)
            try:
                converge(pair, tmp, {A_NAME: link, B_NAME: dict(link, usb_passthrough={GUEST: {"devices": [{"host": A_NAME, "id": STICK}]}})})
                pair.b.wait_usb(lambda devices: any(device["serial"] == SERIAL for device in devices), timeout=120)
                imported[encryption] = [bulk_read(pair.b) for read in range(args.reads)]
                print("bulk read on B, %s: %s MB/s" % (label, ", ".join("%.1f" % rate for rate in imported[encryption])), flush=True)
                pair.b.ssh("virsh", "-q", "-c", "qemu:///system", "start", GUEST)
                wait_in_guest(pair.b, GUEST, SERIAL, timeout=180)
                remote[encryption] = replugs(args.replugs, pair.a, pair.b, label)
                converge(pair, tmp, {A_NAME: link, B_NAME: dict(link, usb_passthrough={GUEST: {"devices": []}})})
            finally:
                pair.b.remove_guest(GUEST)

    print()
    print("from QMP device_add on A to the stick in the guest's info usb (median, min-max, %d replugs):" % args.replugs)
    rows = [("host-local (guest on A)", local), ("across hosts, plain USB/IP", remote.get("none")), ("across hosts, tunnel", remote.get("wireguard"))]
    for label, times in [(label, times) for label, times in rows if times]:
        median = statistics.median(times)
        print("  %-28s %6.2f s  (%.2f-%.2f)  %5.1fx host-local" % (label, median, min(times), max(times), median / statistics.median(local)))
    print("bulk read of the stick, O_DIRECT (median of %d):" % args.reads)
    rows = [("on A directly", direct), ("on B, plain USB/IP", imported.get("none")), ("on B, tunnel", imported.get("wireguard"))]
    for label, rates in [(label, rates) for label, rates in rows if rates]:
        print("  %-28s %6.1f MB/s  %5.2f of direct" % (label, statistics.median(rates), statistics.median(rates) / statistics.median(direct)))
    if len(imported) == 2:
        print("  tunnel / plain              %6.2f" % (statistics.median(imported["wireguard"]) / statistics.median(imported["none"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
