# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Soak: the reattach agent over many replugs of a declared device, on the USB test host (``make soak``).

The stick is attached to a running guest with usb_attach (its intent recorded) and the agent installed through
the kvmhost.usb.passthrough role. Then, once every ``--interval`` seconds, the stick is replugged through QMP
as in benchmarks/replug_latency.py: pulled out, plugged back in once the agent has removed the stale hostdev,
and the guest's ``info usb`` watched until it lists the stick again. Every tenth replug and after the last,
the guest is also checked to hold the stick at the address the kernel gave it this time. The agent's
memory (VmRSS) and open file descriptors are read after the first 10 replugs and at the end; its RSS is also
printed every tenth replug, to tell growth that levels off from growth that goes on.

It fails when a replug did not come back, the agent's RSS at the end is more than 10 % above the first
reading, it holds more file descriptors, or its process changed (restarted). Recovery times are printed,
never asserted. The default, 200 replugs 6 s apart, takes about 20 minutes plus the test host's boot.

Usage: .venv/bin/python -m tests.soak.soak_replug [--replugs 200] [--interval 6] [--name RUNNING_TEST_HOST]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tests.testhost import TestHost
from tests.testhost.agent import agent_process, set_agent
from tests.testhost.ansible import run_module
from tests.testhost.guest import wait_in_guest
from tests.testhost.host import owned_name
from tests.testhost.replug import timed_replug

GUEST = "soakvm"
PRODUCT = "QEMU USB HARDDRIVE"
SERIAL = "KING0001"
BASELINE_AFTER = 10
RSS_GROWTH = 0.10
CHECK_EVERY = 10


def soak(host: TestHost, replugs: int, interval: float) -> list[str]:
    """Replug the stick ``replugs`` times; the failures (empty when the soak passed)."""
    failures = []
    times = []
    baseline = None
    # The agent's RSS every CHECK_EVERY replugs: whether it levels off or keeps growing, beyond the two readings judged.
    series = []
    for number in range(1, replugs + 1):
        started = time.monotonic()
        elapsed = timed_replug(host, GUEST, "stick", PRODUCT)
        if elapsed is None:
            failures.append("replug %d: the stick did not come back in the guest's info usb" % number)
            # Let the agent's next passes catch up, so that the replugs after it are measured from a clean start.
            wait_in_guest(host, GUEST, SERIAL, timeout=120)
        else:
            times.append(elapsed)
        if number % CHECK_EVERY == 0 or number == replugs:
            try:
                wait_in_guest(host, GUEST, SERIAL, timeout=30)
            except AssertionError as error:
                failures.append("replug %d: %s" % (number, error))
        if number == min(BASELINE_AFTER, replugs):
            baseline = agent_process(host)
        if number % CHECK_EVERY == 0:
            series.append((number, agent_process(host)["rss_kib"]))
        print("replug %3d: %s" % (number, "%.2f s" % elapsed if elapsed is not None else "not back"), flush=True)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    end = agent_process(host)
    print()
    print("replugs back in the guest: %d of %d" % (len(times), replugs))
    if times:
        print("recovery, QMP device_add to info usb: median %.2f s, max %.2f s" % (statistics.median(times), max(times)))
    print("agent pid %d -> %d" % (baseline["pid"], end["pid"]))
    print("agent RSS after replug %d: %d KiB, at the end: %d KiB (%+.1f %%)" % (
        min(BASELINE_AFTER, replugs), baseline["rss_kib"], end["rss_kib"], 100.0 * (end["rss_kib"] - baseline["rss_kib"]) / baseline["rss_kib"]))
    print("agent file descriptors after replug %d: %d, at the end: %d" % (min(BASELINE_AFTER, replugs), baseline["fds"], end["fds"]))
    print("agent RSS (KiB) every %d replugs: %s" % (CHECK_EVERY, " ".join("%d:%d" % item for item in series)))
    if end["pid"] != baseline["pid"]:
        failures.append("the agent's process changed (restarted) during the soak")
    if end["rss_kib"] > baseline["rss_kib"] * (1 + RSS_GROWTH):
        failures.append("the agent's RSS grew by more than %d %%" % (RSS_GROWTH * 100))
    if end["fds"] > baseline["fds"]:
        failures.append("the agent holds %d more file descriptors" % (end["fds"] - baseline["fds"]))
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--replugs", type=int, default=200)
    parser.add_argument("--interval", type=float, default=6.0, help="seconds from one replug's start to the next (default: %(default)s)")
    parser.add_argument("--name", help="a running test host to use (default: boot one, stop it afterwards)")
    args = parser.parse_args()
    if args.replugs < 1:
        parser.error("--replugs must be at least 1")
    host = TestHost.running(args.name) if args.name else TestHost(owned_name("soak")).start()
    try:
        set_agent(host, True)
        with host.running_guest(GUEST):
            result = run_module(host, "kvmhost.usb.usb_attach", {"domain": GUEST, "devices": ["46f4:0001"]})
            if result["failed"]:
                raise RuntimeError(result["msg"])
            wait_in_guest(host, GUEST, SERIAL)
            failures = soak(host, args.replugs, args.interval)
        if args.name:
            set_agent(host, False)
    finally:
        if not args.name:
            host.remove()
    for failure in failures:
        print("FAILED: " + failure)
    print("soak %s" % ("failed" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
