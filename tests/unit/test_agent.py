"""The reattach agent's pass (plugins/module_utils/_agent.py) against the run's own real libvirtd, with
USB trees described to umockdev, and its debounce with a fake clock.

This machine has no USB, so a pass is shown on persistent configurations of defined domains: the
re-bind after a replug, the hostdev put back, domains without intent left alone, check mode. The
live side (attach on appearance, stale hostdev removed on unplug, a domain started without its
device) runs on the test host: tests/integration/test_agent_testhost.py.
"""

from __future__ import annotations

import sys

from tests.lib.agentrun import agent_pass, ours
from tests.lib.domain_xml import hostdev, hostdevs, intent, metadata, source_xml
from tests.lib.modrun import attach, collection_root
from tests.lib.trees import KINGSTON, KINGSTON_ID, REFERENCE, REPLUGGED, TWINS, hid

# The debounce is tested in this process.
sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils._agent import Debouncer  # noqa: E402


def test_replug_rebinds_the_persistent_hostdev_once(domains):
    name = domains.define("agent-rebind")
    assert attach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)["changed"] is True
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 2)]
    assert ours(agent_pass(REPLUGGED), name) == ["re-bound 0627:0001:42 in %s (persistent, address 001:007)" % name]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 7)]
    assert metadata(xml) == intent(("0627:0001:42", {"id": "0627:0001:42"}, {"serial": "42", "port": "1-1", "address": "001:007"}))
    assert ours(agent_pass(REPLUGGED), name) == []
    assert domains.inactive(name) == xml


def test_check_mode_says_what_it_would_do_and_changes_nothing(domains):
    name = domains.define("agent-check")
    attach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)
    before = domains.inactive(name)
    assert ours(agent_pass(REPLUGGED, "--check"), name) == [
        "would have re-bound 0627:0001:42 in %s (persistent, address 001:007)" % name
    ]
    assert domains.inactive(name) == before


def test_hostdev_taken_away_by_hand_is_put_back(domains):
    name = domains.define("agent-putback")
    attach({"domain": name, "devices": ["0951:1666"]})
    written = "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'><vendor id='0x0951'/><product id='0x1666'/></source></hostdev>"
    domains.lookup(name).detachDeviceFlags(written, 2)  # VIR_DOMAIN_AFFECT_CONFIG
    assert hostdevs(domains.inactive(name)) == []
    assert ours(agent_pass(REFERENCE), name) == ["attached %s to %s (persistent, by vendor:product)" % (KINGSTON_ID, name)]
    assert hostdevs(domains.inactive(name)) == [hostdev("0951", "1666")]


def test_absent_device_keeps_hostdev_and_intent(domains):
    name = domains.define("agent-absent")
    attach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)
    before = domains.inactive(name)
    without_tablet = [device for device in TWINS if device.get("serial") != "42"]
    assert ours(agent_pass(without_tablet), name) == []
    assert domains.inactive(name) == before


def test_domains_without_intent_are_never_touched(domains):
    # A hand-written hostdev at the replugged tablet's old address, and one with no device at all:
    # stale both, but the domain declares nothing, so the agent leaves it byte for byte.
    name = domains.define("agent-foreign", [source_xml("0627", "0001", 1, 2), source_xml("0951", "1666", 2, 9)])
    before = domains.inactive(name)
    assert ours(agent_pass(REPLUGGED), name) == []
    assert domains.inactive(name) == before


def test_unique_device_replugged_needs_nothing(domains):
    name = domains.define("agent-unique")
    attach({"domain": name, "devices": ["0951:1666"]})
    before = domains.inactive(name)
    replugged = [dict(device, devnum=9) if device is KINGSTON else device for device in REFERENCE]
    assert ours(agent_pass(replugged), name) == []
    assert domains.inactive(name) == before


def test_twin_with_the_same_serial_gets_the_vague_hostdev_pinned_to_the_held_device(domains):
    # Given while unique, the tablet is held by vendor:product; a second tablet with serial 42 arrives at 1-2: the
    # hostdev would designate both (the domain could not start), and the recorded id no longer resolves.
    name = domains.define("agent-twin")
    attach({"domain": name, "devices": ["0627:0001:42"]}, REFERENCE)
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001")]
    clash = REFERENCE + [hid("1-2", 3, serial="42")]
    assert ours(agent_pass(clash), name) == ["re-bound 0627:0001:42 in %s (persistent, address 001:002)" % name]
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 2)]
    assert ours(agent_pass(clash), name) == []


REMOTE_STICK = "46f4:0001:KING0001"


def naming(lines, name):
    return [line for line in lines if name in line]


def remote_intent(device_id):
    """The intent of a device another host exports to this one, as usb_attach with ``host`` records it."""
    return (
        '<passthrough><device id="%s" serial="KING0001" host="kvm1" link_address="10.77.0.1">'
        '<selector id="%s"/></device></passthrough>' % (device_id, device_id)
    )


def test_a_remote_device_is_imported_first_and_keeps_where_it_comes_from(domains):
    # This machine has no vhci-hcd: the import fails, the line says so and why, and the pass leaves the intent as it was.
    name = domains.define("agent-remote")
    domains.set_intent(name, remote_intent(REMOTE_STICK))
    before = domains.inactive(name)
    assert 'host="kvm1" link_address="10.77.0.1"' in before
    assert naming(agent_pass(REFERENCE, "--check"), name) == ["would import %s from kvm1 (10.77.0.1) for %s" % (REMOTE_STICK, name)]
    assert naming(agent_pass(REFERENCE), name) == [
        "cannot import %s from kvm1 (10.77.0.1) for %s: The kernel module vhci-hcd is not loaded (modprobe vhci-hcd); retrying" % (REMOTE_STICK, name)
    ]
    assert domains.inactive(name) == before


def test_debounce_acts_at_once_on_an_event_after_a_quiet_moment():
    debouncer = Debouncer(quiet=0.5, longest=3.0)
    assert not debouncer.due(0.0)
    debouncer.poke(10.0)
    assert debouncer.due(10.0)
    debouncer.clear()
    assert not debouncer.pending
    assert not debouncer.due(20.0)
    # A replug: its add long enough after its remove is acted on at once too.
    debouncer.poke(10.6)
    assert debouncer.due(10.6)


def test_debounce_waits_for_a_quiet_moment_in_a_burst():
    debouncer = Debouncer(quiet=0.5, longest=3.0)
    debouncer.poke(10.0)
    debouncer.clear()
    for now in (10.2, 10.4, 10.6, 10.8):
        debouncer.poke(now)
        assert not debouncer.due(now + 0.1)
    assert not debouncer.due(11.2)
    assert debouncer.due(11.3)


def test_debounce_waits_for_a_quiet_moment_after_events_during_a_pass():
    debouncer = Debouncer(quiet=0.5, longest=3.0)
    debouncer.poke(10.0)
    debouncer.clear()
    # The pass took 2 s; what came meanwhile is read after it.
    debouncer.poke(12.0, during_pass=True)
    assert not debouncer.due(12.4)
    assert debouncer.due(12.5)


def test_debounce_does_not_wait_forever_in_an_endless_storm():
    debouncer = Debouncer(quiet=0.5, longest=3.0)
    now = 0.0
    passes = []
    while now < 10.0:
        debouncer.poke(now)
        if debouncer.due(now + 0.05):
            passes.append(round(now, 1))
            debouncer.clear()
        now += 0.2
    # Events every 0.2 s never leave 0.5 s of quiet: the first at once, then a pass every 3 s all the same.
    assert passes == [0.0, 3.2, 6.4, 9.6]
