"""The host changes between the plan and its steps: a device is unplugged, a domain is destroyed.

The real planner runs in its own process under umockdev-run (tests/lib/midchange_driver.py) against the run's
libvirtd; it pauses after its plan (or just before one of its libvirt calls), the test changes the host for
real (the device's sysfs directory and /dev node are taken out of the umockdev testbed, the domain is destroyed
through libvirt), and releases it. What each case must end in:

- a device the plan attaches, unplugged: the change fails naming the device, the steps done are undone, every
  domain's XML is byte for byte as before, the intent included;
- a device the plan only detaches, unplugged: the detach is finished (it needs no device; undoing it would
  give the domain back a hostdev of a device that is gone), and a warning names the device;
- a domain destroyed before its live steps: its persistent configuration and intent get the device, as
  usb_attach to a stopped domain gives it, with a warning; with persistent: false the change fails instead.

The same on the real-USB test host, with live hostdevs: tests/integration/test_midchange_testhost.py.
"""

from __future__ import annotations

import pytest

from tests.lib import midchange, usbtree
from tests.lib.domain_xml import hostdev, hostdevs, intent, metadata
from tests.lib.modrun import attach
from tests.lib.trees import KINGSTON, KINGSTON_ID, REFERENCE

KINGSTON_HOSTDEV = hostdev("0951", "1666")
KINGSTON_INTENT = intent((KINGSTON_ID, {"vendor_id": "0951", "product_id": "1666"}))
GONE = "Device %s (Kingston Technology DataTraveler 100 G3/G4/SE9 G2/50, serial E0D55EA5741AF160B9740A81, port 2-1, address 002:002)" % KINGSTON_ID


@pytest.fixture
def runs(tmp_path):
    """Start drivers: ``runs(operation, args, pause)``; each is stopped at the end if it still runs."""
    started = []

    def start(operation, args, pause="execute"):
        run = midchange.local(midchange.request(operation, args, pause), REFERENCE, str(tmp_path))
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


def unplug_stick(paused):
    usbtree.unplug(paused["umockdev_dir"], KINGSTON)


def test_attach_of_a_device_unplugged_after_the_plan_fails_naming_it_and_changes_nothing(domains, runs):
    name = domains.define("gone-attach")
    before = domains.snapshot()
    run = runs("attach", {"domain": name, "devices": ["0951:1666"]})
    paused = run.paused()
    assert paused["steps"][0].startswith("attach to %s (persistent)" % name), paused
    unplug_stick(paused)
    ok, outcome = run.release()
    assert not ok, outcome
    assert outcome["msg"] == GONE + " was unplugged during the change, before it could %s. Nothing was changed." % paused["steps"][0]
    assert domains.snapshot() == before


def test_move_of_a_device_unplugged_meanwhile_fails_naming_it_and_writes_nothing(domains, runs):
    holder = domains.define("gone-holder")
    taker = domains.define("gone-taker")
    assert attach({"domain": holder, "devices": ["0951:1666"]})["rc"] == 0
    before = domains.snapshot()
    assert (hostdevs(before[holder][0]), metadata(before[holder][0])) == ([KINGSTON_HOSTDEV], KINGSTON_INTENT)
    run = runs("converge", {"domains": {holder: {"devices": []}, taker: {"devices": ["0951:1666"]}}})
    paused = run.paused()
    assert [step.split(":")[0] for step in paused["steps"]] == [
        "detach from %s (persistent)" % holder,
        "attach to %s (persistent)" % taker,
        "record the intent of %s (persistent)" % holder,
        "record the intent of %s (persistent)" % taker,
    ]
    unplug_stick(paused)
    ok, outcome = run.release()
    assert not ok, outcome
    assert outcome["msg"] == GONE + " was unplugged during the change, before it could %s. Nothing was changed." % paused["steps"][0], outcome
    assert domains.snapshot() == before


def test_domain_undefined_before_its_definition_is_written_undoes_the_other_domains(domains, runs):
    # Stopped domains are written with one define each, at their last step: the holder's first, then the taker's.
    holder = domains.define("undefined-holder")
    taker = domains.define("undefined-taker")
    assert attach({"domain": holder, "devices": ["0951:1666"]})["rc"] == 0
    before = domains.snapshot()
    run = runs("converge", {"domains": {holder: {"devices": []}, taker: {"devices": ["0951:1666"]}}}, "step 1")
    run.paused()
    domains.remove(taker)
    ok, outcome = run.release()
    assert not ok, outcome
    refused = "libvirt refused to write the definition of %s (attach to %s (persistent); record the intent of %s (persistent)): "
    assert outcome["msg"].startswith(refused % (taker, taker, taker)), outcome
    assert outcome["msg"].endswith("The 1 earlier step(s) were undone; %s left as they were." % holder), outcome
    assert domains.snapshot() == {holder: before[holder]}


def test_detach_of_a_device_unplugged_after_the_plan_is_finished_and_says_so(domains, runs):
    name = domains.define("gone-detach")
    assert attach({"domain": name, "devices": ["0951:1666"]})["rc"] == 0
    run = runs("detach", {"domain": name, "devices": ["0951:1666"]})
    unplug_stick(run.paused())
    ok, result = run.release()
    assert ok, result
    assert result["warnings"] == [GONE + " was unplugged during the change; it was taken from %s all the same (a detach needs no device)." % name]
    xml = domains.inactive(name)
    assert (hostdevs(xml), metadata(xml)) == ([], None)


@pytest.mark.parametrize("operation", ["attach", "converge"])
def test_domain_destroyed_before_its_live_attach_gets_the_persistent_part(domains, runs, operation):
    name = domains.define("destroyed-" + operation)
    domains.lookup(name).create()
    if operation == "attach":
        run = runs("attach", {"domain": name, "devices": ["0951:1666"]})
    else:
        run = runs("converge", {"domains": {name: {"devices": ["0951:1666"]}}})
    paused = run.paused()
    assert [step.split(":")[0] for step in paused["steps"]] == [
        "attach to %s (live)" % name,
        "attach to %s (persistent)" % name,
        "record the intent of %s (live)" % name,
        "record the intent of %s (persistent)" % name,
    ]
    domains.lookup(name).destroy()
    ok, result = run.release()
    assert ok, result
    assert result["warnings"] == [
        "Domain %s stopped running during the change (it is now shutoff), before it could %s. Its live steps were skipped "
        "(its live configuration ended with it); its persistent configuration and intent were changed as planned, so it has "
        "the devices when it starts." % (name, paused["steps"][0])
    ]
    state = result["domain"]["state"] if operation == "attach" else result["domains"][name]["state"]
    assert state == "shutoff"
    assert not domains.lookup(name).isActive()
    xml = domains.inactive(name)
    assert (hostdevs(xml), metadata(xml)) == ([KINGSTON_HOSTDEV], KINGSTON_INTENT)
    # What usb_attach to the stopped domain would have done: nothing is left to do.
    again = attach({"domain": name, "devices": ["0951:1666"]})
    assert (again["rc"], again["changed"]) == (0, False), again


def test_live_only_attach_to_a_domain_destroyed_meanwhile_fails_and_changes_nothing(domains, runs):
    name = domains.define("destroyed-live-only")
    domains.lookup(name).create()
    run = runs("attach", {"domain": name, "devices": ["0951:1666"], "options": {"persistent": False}})
    paused = run.paused()
    assert [step.split(":")[0] for step in paused["steps"]] == ["attach to %s (live)" % name, "record the intent of %s (live)" % name]
    domains.lookup(name).destroy()
    before = domains.snapshot()
    ok, outcome = run.release()
    assert not ok, outcome
    assert outcome["msg"] == (
        "Domain %s stopped running during the change (it is now shutoff), before it could %s; persistent: false changes "
        "the running domain only. Nothing was changed." % (name, paused["steps"][0])
    )
    assert domains.snapshot() == before
