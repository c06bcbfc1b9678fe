"""Two operators at once, and the reattach agent: ten usb_attach and usb_detach runs on different devices
and domains of the real-USB test host, started together, while a replug makes the agent attach a device.

Each run rewrites a domain's hostdevs and intent metadata from what it read; the host lock serialises
them. The end state must hold every run's effect: each domain's intent and hostdevs (persistent, and live
for running ones) exactly the expected devices, every hostdev designating a present device, no device in
two domains, the running guests' QEMU holding their devices, and one agent journal line for its action.

Round 1 detaches four devices and attaches six; round 2 moves them back the other way, and starts a shut-off
domain (auto_start) while another run detaches a device from it. One guest runs throughout, the second
from round 2 on. Eight extra devices (keyboards and mice with their own serials) are plugged in through QMP
for the module and pulled out at its end; the agent is installed and removed through the role.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.testhost import Device, TestHost
from tests.testhost.agent import journal, set_agent, wait_journal
from tests.testhost.ansible import run_module
from tests.testhost.guest import host_path

RUNNING = "cc-run"
SHUT_OFF = ("cc-off1", "cc-off2", "cc-off3")
# Behind the topology's hub (QEMU port 5, kernel 1-5), beside the serial adapter on its port 1; one in a root port.
EXTRA = [Device(id="cc-kbd%d" % number, kind="keyboard", port="5.%d" % (number + 1), serial="CC-KBD%d" % number) for number in range(1, 5)]
EXTRA += [Device(id="cc-mouse%d" % number, kind="mouse", port="5.%d" % (number + 5), serial="CC-MOUSE%d" % number) for number in range(1, 4)]
EXTRA += [Device(id="cc-kbd5", kind="keyboard", port="8", serial="CC-KBD5")]
IDS = {
    "stick": "46f4:0001:KING0001",
    "twin-a": "0627:0001:TWIN-A",
    "twin-b": "0627:0001:TWIN-B",
    "serial0": "0403:6001:FTDI0001",
}
IDS.update((device.id, "0627:0001:" + device.serial) for device in EXTRA)
SERIALS = {"stick": "KING0001", "twin-a": "TWIN-A", "twin-b": "TWIN-B", "serial0": "FTDI0001"}
SERIALS.update((device.id, device.serial) for device in EXTRA)

# The stick stays with the running guest: unplugged before each burst and plugged in during it, the agent attaches it.
HELD = {
    RUNNING: ["stick", "twin-a"],
    "cc-off1": ["twin-b", "cc-kbd4"],
    "cc-off2": ["serial0"],
    "cc-off3": ["cc-kbd1"],
}
# (module, domain or None for "whichever holds it", device, extra arguments)
ROUNDS = [
    [
        ("usb_detach", RUNNING, "twin-a", {}),
        ("usb_detach", None, "twin-b", {}),
        ("usb_detach", "cc-off2", "serial0", {}),
        ("usb_detach", None, "cc-kbd1", {}),
        ("usb_attach", RUNNING, "cc-kbd2", {}),
        ("usb_attach", RUNNING, "cc-mouse1", {}),
        ("usb_attach", "cc-off1", "cc-mouse2", {}),
        ("usb_attach", "cc-off2", "cc-kbd3", {}),
        ("usb_attach", "cc-off3", "cc-mouse3", {}),
        ("usb_attach", "cc-off3", "cc-kbd5", {}),
    ],
    [
        ("usb_detach", RUNNING, "cc-kbd2", {}),
        ("usb_detach", None, "cc-mouse1", {}),
        ("usb_detach", "cc-off1", "cc-mouse2", {}),
        ("usb_detach", None, "cc-kbd3", {}),
        ("usb_detach", "cc-off3", "cc-mouse3", {}),
        ("usb_detach", None, "cc-kbd5", {}),
        ("usb_attach", RUNNING, "cc-kbd1", {}),
        ("usb_attach", "cc-off1", "twin-a", {}),
        ("usb_attach", "cc-off2", "twin-b", {}),
        ("usb_attach", "cc-off3", "serial0", {"auto_start": True}),
    ],
]
EXPECTED = [
    {RUNNING: ["stick", "cc-kbd2", "cc-mouse1"], "cc-off1": ["cc-kbd4", "cc-mouse2"], "cc-off2": ["cc-kbd3"], "cc-off3": ["cc-mouse3", "cc-kbd5"]},
    {RUNNING: ["stick", "cc-kbd1"], "cc-off1": ["cc-kbd4", "twin-a"], "cc-off2": ["twin-b"], "cc-off3": ["serial0"]},
]


@pytest.fixture(scope="module")
def host(testhost: TestHost) -> Iterator[TestHost]:
    """The test host with the extra devices plugged in, the agent running and the domains defined (one running)."""
    with testhost.qmp() as qmp:
        for device in EXTRA:
            qmp.plug(device)
    testhost.wait_usb(lambda devices: {device.serial for device in EXTRA} <= {device["serial"] for device in devices})
    set_agent(testhost, True)
    try:
        testhost.create_guest(RUNNING)
        for name in SHUT_OFF:
            testhost.create_guest(name, start=False)
        yield testhost
    finally:
        for name in (RUNNING,) + SHUT_OFF:
            testhost.remove_guest(name)
        set_agent(testhost, False)
        with testhost.qmp() as qmp:
            present = qmp.usb_device_ids()
            for device in EXTRA:
                if device.id in present:
                    qmp.unplug(device.id)
            if "stick" not in present:
                testhost.plug("stick")
        testhost.wait_usb(lambda devices: not {device.serial for device in EXTRA} & {device["serial"] for device in devices})


def run(host: TestHost, module: str, domain: str | None, device: str, extra: dict[str, Any]) -> dict[str, Any]:
    args = dict(extra, devices=[IDS[device]])
    if domain:
        args["domain"] = domain
    return run_module(host, "kvmhost.usb." + module, args)


def burst(host: TestHost, runs: list[tuple[str, str | None, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The runs, each an ansible process of its own, started together with the stick's plug; their results in order."""
    with ThreadPoolExecutor(max_workers=len(runs) + 1) as pool:
        futures = [pool.submit(run, host, *spec) for spec in runs]
        pool.submit(host.plug, "stick").result()
        return [future.result() for future in futures]


def end_state(host: TestHost) -> dict[str, dict[str, Any]]:
    """Per domain of ours: its state, and per configuration the intent's devices (with their status) and the devices its hostdevs designate."""
    facts = run_module(host, "kvmhost.usb.usb_facts")
    assert not facts["failed"], facts
    names = dict((device_id, name) for name, device_id in IDS.items())
    found = {}
    for domain in facts["ansible_facts"]["usb_domains"]:
        if domain["name"] not in HELD:
            continue
        found[domain["name"]] = {"state": domain["state"]}
        for scope in ("live", "persistent"):
            if domain[scope] is None:
                continue
            found[domain["name"]][scope] = {
                "intent": sorted((names.get(entry["id"], entry["id"]), entry["status"]) for entry in domain[scope]["intent"]),
                "hostdevs": sorted(designated(hostdev, names) for hostdev in domain[scope]["hostdevs"]),
            }
    # No device in two domains, ours or any other.
    found["holders"] = dict(
        (names[device["id"]], device["attached_to"]) for device in facts["ansible_facts"]["usb_devices"] if device["id"] in names
    )
    return found


def designated(hostdev: dict[str, Any], names: dict[str, str]) -> str:
    """The devices a hostdev designates, by topology id ("none" for a stale one, "a+b" for a vague one)."""
    return "+".join(names.get(device_id, device_id) for device_id in hostdev["devices"]) or "none"


def expected_state(expected: dict[str, list[str]], running: list[str]) -> dict[str, dict[str, Any]]:
    state = {}
    for name, devices in expected.items():
        config = {"intent": sorted((device, "attached") for device in devices), "hostdevs": sorted(devices)}
        state[name] = {"state": "running" if name in running else "shutoff", "persistent": config}
        if name in running:
            state[name]["live"] = config
    state["holders"] = dict((device, {"live": [], "persistent": []}) for device in IDS)
    for name, devices in expected.items():
        for device in devices:
            state["holders"][device] = {"live": [name] if name in running else [], "persistent": [name]}
    return state


def held_by_guest(host: TestHost, name: str) -> list[str]:
    """The devices the running guest's QEMU holds at their present kernel addresses, by topology id."""
    paths = {}
    for device in host.kernel_usb_devices():
        for topology_id, serial in SERIALS.items():
            if device["serial"] == serial:
                paths["/dev/bus/usb/%03d/%03d" % (int(device["busnum"]), int(device["devnum"]))] = topology_id
    return sorted(paths.get(host_path(device), host_path(device)) for device in host.guest_usb(name) if device["host"] and device["host"]["attached"])


RECONNECT = re.compile(r"^(lost the connection to \S+ \(.*\); reconnecting|connected to \S+ again after [0-9.]+ s; catching up)$")


def test_ten_concurrent_runs_and_the_agent_lose_nothing(host: TestHost) -> None:
    declared = dict((name, {"devices": [IDS[device] for device in devices]}) for name, devices in HELD.items())
    setup = run_module(host, "kvmhost.usb.usb_passthrough", {"domains": declared})
    assert not setup["failed"], setup
    running = [RUNNING]
    assert end_state(host) == expected_state(HELD, running)

    for number, (runs, expected) in enumerate(zip(ROUNDS, EXPECTED), 1):
        start = len(journal(host))
        host.unplug("stick")
        wait_journal(host, start, r"^removed stale %s from %s \(live, " % (IDS["stick"], RUNNING))
        start = len(journal(host))

        results = burst(host, runs)

        failed = [(spec, result) for spec, result in zip(runs, results) if result["failed"] or not result["changed"]]
        assert failed == [], "round %d" % number
        running += [domain for _module, domain, _device, extra in runs if extra.get("auto_start")]
        wait_journal(host, start, r"^attached %s to %s \(live, " % (IDS["stick"], RUNNING))
        assert end_state(host) == expected_state(expected, running), "round %d" % number
        for name in running:
            assert held_by_guest(host, name) == sorted(expected[name]), "round %d: %s" % (number, name)
        # One line for the agent's one action, and no failure. A loaded test host may make libvirtd drop the agent's
        # connection (keepalive): the agent says so, reconnects and catches up, which is no action of its own.
        lines = journal(host)[start:]
        print("round %d, the agent's journal: %s" % (number, lines))
        actions = [line for line in lines if not RECONNECT.match(line)]
        assert len(actions) == 1 and actions[0].startswith("attached "), lines
