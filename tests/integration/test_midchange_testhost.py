"""The host changes between the plan and its steps, on the real-USB test host: the stick is pulled out through
QMP on the outer QEMU, a guest is destroyed with virsh.

The real planner runs on the test host (tests/lib/midchange_driver.py with a copy of the collection's
module_utils, over SSH) and pauses after its plan, or just before one of its libvirt calls; the test changes
the host, waits until the kernel has let the stick go, and releases it. What each case must end in:

- usb_attach of the stick, pulled out after the plan: fails naming it; every guest's live and persistent XML is
  as before, byte for byte.
- A converge that moves the stick between two running guests, pulled out after the detach from the first and
  just before the live attach to the second (libvirt refuses it: the device is gone): fails naming it, the
  detach is undone in the persistent configuration and the intent of the first guest is as before; its live
  hostdev is not given back, since it would designate a device that is gone. The stick is in no guest.
- usb_detach of the stick, pulled out after the plan: the detach is finished (a detach needs no device) and
  a warning names it; no hostdev or intent of it is left.
- A guest destroyed during usb_attach, before its first step or after its live attach: the persistent part is
  finished, with a warning; started again, the guest holds the stick.

The same cases in the unit tier (umockdev, no live hostdevs): tests/unit/test_midchange.py. Each test puts the
stick back and removes its guests, so the next test finds the default topology.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.lib.midchange import DRIVER, PausedRun
from tests.testhost import TestHost
from tests.testhost.ansible import run_module
from tests.testhost.code import ship_script
from tests.testhost.devices import STICK
from tests.testhost.guest import bound_in_guest, hostdev_sources, virsh

SERIAL = "KING0001"
REMOTE = "/root/kvmhost-usb-midchange"


@pytest.fixture(scope="module")
def driver(testhost: TestHost) -> str:
    """The driver and the module_utils it imports on the test host, as an importable ansible_collections tree."""
    return ship_script(testhost, REMOTE, DRIVER)


def start(host: TestHost, driver: str, operation: str, args: dict, pause: str = "execute") -> PausedRun:
    argument = json.dumps({"operation": operation, "args": args, "pause": pause, "uri": "qemu:///system"})
    return PausedRun(host.ssh_command(["env", "PYTHONPATH=" + REMOTE, "python3", driver, argument]))


@pytest.fixture
def runs(testhost: TestHost, driver: str) -> Iterator:
    started: list[PausedRun] = []

    def run(operation: str, args: dict, pause: str = "execute") -> PausedRun:
        started.append(start(testhost, driver, operation, args, pause))
        return started[-1]

    yield run
    for paused in started:
        paused.stop()


@pytest.fixture
def guests(testhost: TestHost) -> Iterator:
    """``guests(*names)`` starts fresh running guests; all are removed after the test."""
    created: list[str] = []

    def make(*names: str) -> list[str]:
        for name in names:
            testhost.remove_guest(name)
            testhost.create_guest(name)
            created.append(name)
        return list(names)

    yield make
    for name in created:
        testhost.remove_guest(name)


@pytest.fixture
def stick_back(testhost: TestHost) -> Iterator[None]:
    """The test pulls the stick out; it is put back at its port afterwards."""
    yield
    if testhost.kernel_device(serial=SERIAL) is None:
        testhost.plug("stick")
        testhost.wait_usb(lambda devices: any(device["serial"] == SERIAL for device in devices))


def pull_stick(host: TestHost) -> None:
    host.unplug("stick")
    host.wait_usb(lambda devices: not any(device["serial"] == SERIAL for device in devices))


def xml(host: TestHost, names: list[str]) -> dict[str, tuple[str, str]]:
    """Every named guest's (live, persistent) XML as libvirt prints it."""
    return {name: (virsh(host, "dumpxml", name).stdout, virsh(host, "dumpxml", "--inactive", name).stdout) for name in names}


def attach(host: TestHost, guest: str) -> None:
    result = run_module(host, "kvmhost.usb.usb_attach", {"domain": guest, "devices": [STICK]})
    assert not result["failed"], result
    assert bound_in_guest(host, guest, SERIAL), host.guest_usb(guest)


def gone(message: str) -> bool:
    return message.startswith("Device %s (" % STICK) and " was unplugged during the change" in message


def test_attach_of_the_stick_pulled_out_after_the_plan_fails_and_changes_no_guest(testhost: TestHost, runs, guests, stick_back) -> None:
    [vm] = guests("mid-attach")
    before = xml(testhost, [vm])
    run = runs("attach", {"domain": vm, "devices": [STICK]})
    paused = run.paused()
    assert paused["steps"][0].startswith("attach to %s (live)" % vm), paused
    pull_stick(testhost)
    ok, outcome = run.release()
    assert not ok, outcome
    assert gone(outcome["msg"]) and outcome["msg"].endswith("Nothing was changed."), outcome
    assert xml(testhost, [vm]) == before


def test_move_interrupted_by_the_pull_undoes_the_detach_and_gives_back_no_dead_hostdev(testhost: TestHost, runs, guests, stick_back) -> None:
    g1, g2 = guests("mid-move-1", "mid-move-2")
    attach(testhost, g1)
    before = xml(testhost, [g1, g2])
    intent_before = virsh(testhost, "metadata", g1, "http://kvmhost.usb/ns/passthrough/1").stdout
    # Just before the live attach to g2, after the planner found the stick still there for it.
    run = runs("converge", {"domains": {g1: {"devices": []}, g2: {"devices": [STICK]}}}, pause="step 2")
    paused = run.paused()
    assert [step.split(":")[0] for step in paused["steps"][:4]] == [
        "detach from %s (live)" % g1,
        "detach from %s (persistent)" % g1,
        "attach to %s (live)" % g2,
        "attach to %s (persistent)" % g2,
    ]
    pull_stick(testhost)
    ok, outcome = run.release()
    assert not ok, outcome
    message = outcome["msg"]
    assert gone(message) and ": libvirt refused to %s" % paused["steps"][2] in message, message
    assert "The 1 earlier step(s) were undone; %s left as they were." % g1 in message, message
    assert "Not put back, as its device is gone: %s" % paused["steps"][0] in message, message
    after = xml(testhost, [g1, g2])
    assert after[g2] == before[g2]
    assert after[g1][1] == before[g1][1]
    # Live, g1 lost only the stick's hostdev, which designated a device that is gone.
    assert len(hostdev_sources(testhost, g1, inactive=True)) == 1 and hostdev_sources(testhost, g1) == []
    assert virsh(testhost, "metadata", g1, "http://kvmhost.usb/ns/passthrough/1").stdout == intent_before
    assert virsh(testhost, "metadata", g1, "http://kvmhost.usb/ns/passthrough/1", "--config").stdout == intent_before
    assert [device for device in testhost.guest_usb(g2) if device["host"]] == []


def test_detach_of_the_stick_pulled_out_after_the_plan_is_finished(testhost: TestHost, runs, guests, stick_back) -> None:
    [vm] = guests("mid-detach")
    attach(testhost, vm)
    run = runs("detach", {"domain": vm, "devices": [STICK]})
    run.paused()
    pull_stick(testhost)
    ok, result = run.release()
    assert ok, result
    [warning] = result["warnings"]
    assert gone(warning) and warning.endswith("it was taken from %s all the same (a detach needs no device)." % vm), warning
    assert hostdev_sources(testhost, vm) == [] and hostdev_sources(testhost, vm, inactive=True) == []
    live, persistent = xml(testhost, [vm])[vm]
    assert "kvmhost-usb:passthrough" not in live and "kvmhost-usb:passthrough" not in persistent


@pytest.mark.parametrize("pause", ["execute", "step 1"], ids=["before-any-step", "after-the-live-attach"])
def test_guest_destroyed_during_an_attach_gets_the_persistent_part(testhost: TestHost, runs, guests, pause: str) -> None:
    [vm] = guests("mid-destroyed")
    run = runs("attach", {"domain": vm, "devices": [STICK]}, pause=pause)
    paused = run.paused()
    virsh(testhost, "destroy", vm)
    ok, result = run.release()
    assert ok, result
    [warning] = result["warnings"]
    assert warning.startswith("Domain %s stopped running during the change (it is now shutoff), before it could " % vm), warning
    assert result["domain"]["state"] == "shutoff"
    skipped = paused["steps"][0] if pause == "execute" else paused["steps"][2]
    assert skipped.startswith("%s %s (live)" % ("attach to" if pause == "execute" else "record the intent of", vm)), paused
    assert "before it could %s." % skipped in warning, warning
    [persistent] = hostdev_sources(testhost, vm, inactive=True)
    assert "<vendor id='0x46f4'/><product id='0x0001'/>" in persistent, persistent
    assert STICK in virsh(testhost, "metadata", vm, "http://kvmhost.usb/ns/passthrough/1", "--config").stdout
    virsh(testhost, "start", vm)
    assert bound_in_guest(testhost, vm, SERIAL), testhost.guest_usb(vm)
