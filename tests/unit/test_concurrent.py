"""Concurrent runs on one host against the run's own real libvirtd, under umockdev: ten usb_attach and
usb_detach processes on different devices and domains, and a pass of the reattach agent, all at once.

Each run rewrites a domain's hostdevs and its intent metadata from what it read: a run that read
before another wrote would drop the other's change when it writes. The host lock serialises them;
the end state must hold every run's effect. (The live side runs on the test host:
tests/integration/test_concurrent_testhost.py.)
"""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET

from tests.lib.agentrun import agent_pass
from tests.lib.domain_xml import NAMESPACE
from tests.lib.modrun import attach, detach, run_module
from tests.lib.trees import hid
from tests.lib.usbtree import root_hub


# Twelve identical HID devices told apart by their serials (S01 at port 1-1 as device 2, ...), so every
# persistent hostdev is pinned to an address. S11, which d0 holds, is replugged between the setup and the
# burst: the agent's pass re-binds it while the modules run.
TREE = [root_hub(1)] + [hid("1-%d" % number, number + 1, serial="S%02d" % number) for number in range(1, 13)]
REPLUGGED = [dict(device, devnum=40) if device.get("serial") == "S11" else device for device in TREE]
HELD = {"d0": ["S01", "S11"], "d1": ["S02"], "d2": ["S03", "S12"], "d3": ["S04"]}
# usb_detach of S02 and S04 names no domain: it finds the holder.
DETACHES = [("d0", "S01"), (None, "S02"), ("d2", "S03"), (None, "S04")]
ATTACHES = [("d0", "S05"), ("d0", "S06"), ("d1", "S07"), ("d2", "S08"), ("d3", "S09"), ("d3", "S10")]
EXPECTED = {"d0": ["S05", "S06", "S11"], "d1": ["S07"], "d2": ["S08", "S12"], "d3": ["S09", "S10"]}


def device_id(serial):
    return "0627:0001:" + serial


def address(serial, tree):
    [device] = [device for device in tree if device.get("serial") == serial]
    return (1, device["devnum"])


def persistent_state(domains, name):
    """The persistent XML's intent entries (device ids) and USB hostdevs (bus, device), each sorted."""
    root = ET.fromstring(domains.inactive(name))
    entries = root.findall("./metadata/{%s}passthrough/{%s}device" % (NAMESPACE, NAMESPACE))
    sources = [hostdev.find("source/address") for hostdev in root.findall("./devices/hostdev[@type='usb']")]
    return sorted(entry.get("id") for entry in entries), sorted((int(source.get("bus")), int(source.get("device"))) for source in sources)


def burst(names):
    """The ten module runs and the agent pass, each in its own process, started together; their results."""
    runs = [("detach %s" % serial, detach, {"domain": names[domain]} if domain else {}, serial) for domain, serial in DETACHES]
    runs += [("attach %s" % serial, attach, {"domain": names[domain]}, serial) for domain, serial in ATTACHES]
    results = {}

    def run(label, module, args, serial):
        results[label] = module(dict(args, devices=[device_id(serial)]), REPLUGGED)

    def agent():
        results["agent"] = agent_pass(REPLUGGED)

    threads = [threading.Thread(target=run, args=spec) for spec in runs] + [threading.Thread(target=agent)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_ten_concurrent_runs_and_an_agent_pass_lose_nothing(domains):
    for round_number in range(2):
        names = dict((key, domains.define("burst-%d-%s" % (round_number, key))) for key in HELD)
        declared = dict((names[key], {"devices": [device_id(serial) for serial in serials]}) for key, serials in HELD.items())
        setup = run_module("usb_passthrough", {"domains": declared}, TREE)
        assert setup["rc"] == 0, setup

        results = burst(names)

        for label, result in results.items():
            if label != "agent":
                assert result["rc"] == 0 and result["changed"] is True, (label, result)
        new = address("S11", REPLUGGED)
        ours = [line for line in results["agent"] if names["d0"] in line]
        assert ours == ["re-bound %s in %s (persistent, address %03d:%03d)" % (device_id("S11"), names["d0"], new[0], new[1])], results["agent"]
        found = dict((key, persistent_state(domains, names[key])) for key in EXPECTED)
        expected = dict(
            (key, ([device_id(serial) for serial in serials], sorted(address(serial, REPLUGGED) for serial in serials)))
            for key, serials in EXPECTED.items()
        )
        assert found == expected, "round %d" % round_number
        for name in names.values():
            domains.remove(name)
