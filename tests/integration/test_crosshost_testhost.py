"""A USB device on one host, used by a guest on another (USB/IP): two test hosts booted together and linked
over loopback (tests/testhost/pair.py), converged by the kvmhost.usb.converge playbook over both.

Host A (kvm1, 10.77.0.1) has the stick KING0001, with a marker file written into its image on the outer
side before boot; host B (kvm2, 10.77.0.2) has no USB device and a nested guest that declares the stick
with ``host: kvm1``. The tests run in order on one boot of the pair and share its state: each leaves the
stick declared for and held by B's guest, until the ones that take it back and the bad input at the end.
The two-host tests live in this module of their own: they are the longest of the real-USB tier.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.testhost import TestHost
from tests.testhost.agent import UNIT as AGENT_UNIT
from tests.testhost.ansible import play_fleet, run_module_on
from tests.testhost.code import ship_runtime
from tests.testhost.guest import bound_in_guest, kernel_address
from tests.testhost.host import PYTEST_PREFIX, owned_name
from tests.testhost.pair import A_NAME, B_NAME, MARKER_FILE, STRANGER_ADDRESS, LinkedPair

GUEST = "crossvm"
LOCAL_GUEST = "localvm"
STICK = "46f4:0001:KING0001"
SERIAL = "KING0001"
EXPORTER_UNIT = "kvmhost-usb-exporter.service"
EXPORTS = "/etc/kvmhost-usb/exports.json"
IMPORTS_DIR = "/run/kvmhost-usb/imports"
VHCI_STATUS = "/sys/devices/platform/vhci_hcd.0/status"
MARKER = "kvmhost.usb cross-host marker " + secrets.token_hex(8)
SMOKE_DIR = "/root/usbip-smoke"
SMOKE_PROGRAM = SMOKE_DIR + "/kvmhost-usb.pyz"
USBIP_PORT = 3240
SMOKE_UNIT = "usbip-smoke-exporter"

# Run on a test host with the runtime's zipapp on sys.path: print what an importer call returns, as JSON.
CALL_IMPORTER = (
    "import json, sys; sys.path.insert(0, %r); "
    "from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import importer; print(json.dumps(importer.%s))"
)

# Run on a test host: mount the stick with this serial read-only and print the marker file.
READ_MARKER = r"""
import glob, os, subprocess, sys, tempfile, time
serial, name = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while True:
    disks = [path for path in glob.glob("/dev/disk/by-id/usb-*_%s-*" % serial) if "-part" not in path]
    if disks:
        break
    if time.monotonic() > deadline:
        sys.exit("no block device for %s under /dev/disk/by-id" % serial)
    time.sleep(0.5)
directory = tempfile.mkdtemp()
subprocess.run(["mount", "-o", "ro", disks[0], directory], check=True)
try:
    with open(os.path.join(directory, name)) as handle:
        sys.stdout.write(handle.read())
finally:
    subprocess.run(["umount", directory], check=True)
"""


@pytest.fixture(scope="module")
def pair() -> Iterator[LinkedPair]:
    with LinkedPair(owned_name(PYTEST_PREFIX, "xhost"), marker=MARKER) as linked:
        yield linked


@pytest.fixture(scope="module")
def guest_b(pair: LinkedPair) -> Iterator[str]:
    """B's guest, defined but not started: the import is read on B before the guest takes the stick."""
    pair.b.remove_guest(GUEST)
    pair.b.create_guest(GUEST, start=False)
    try:
        yield GUEST
    finally:
        pair.b.remove_guest(GUEST)


def declared(domain: str = GUEST, devices: list[Any] | None = None) -> dict[str, dict[str, Any]]:
    """B's host vars declaring the stick on A (or ``devices``) for its guest."""
    return {B_NAME: {"usb_passthrough": {domain: {"devices": [{"host": A_NAME, "id": STICK}] if devices is None else devices}}}}


def converge(pair: LinkedPair, directory, hostvars: dict[str, Any], *options: str):
    return play_fleet(pair.inventory(directory, hostvars), "converge.yml", *options)


def read_marker(host: TestHost) -> str:
    return host.ssh("python3", "-", SERIAL, MARKER_FILE, input=READ_MARKER).stdout


def driver_of(host: TestHost, port: str) -> str | None:
    """The kernel driver bound to a USB device (usb, usbip-host), None when unbound or absent."""
    result = host.ssh("readlink", "/sys/bus/usb/devices/%s/driver" % port, check=False)
    return result.stdout.strip().rsplit("/", 1)[-1] if result.returncode == 0 else None


def vhci_ports_in_use(host: TestHost) -> list[str]:
    """B's vhci ports holding an imported device (empty when vhci-hcd is not even loaded)."""
    result = host.ssh("sh", "-c", "cat /sys/devices/platform/vhci_hcd.*/status", check=False)
    if result.returncode != 0:
        return []
    ports = []
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        # hub port sta spd dev sockfd local_busid; status 6 is VDEV_ST_USED.
        if len(fields) >= 3 and fields[2] == "006":
            ports.append(fields[1])
    return ports


def exporter_journal(host: TestHost) -> list[str]:
    return host.ssh("journalctl", "-u", EXPORTER_UNIT, "-o", "cat", "--no-pager").stdout.splitlines()


def agent_journal(host: TestHost) -> list[str]:
    return host.ssh("journalctl", "-u", AGENT_UNIT, "-o", "cat", "--no-pager").stdout.splitlines()


def stick_port(pair: LinkedPair) -> str:
    return pair.a.topology.linux_port("stick")


def state(pair: LinkedPair) -> dict[str, Any]:
    """What a run must not change on either host when it fails or runs in check mode."""
    return {
        "exports": pair.a.ssh("cat", EXPORTS, check=False).stdout,
        "stick driver on A": driver_of(pair.a, stick_port(pair)),
        "imports on B": vhci_ports_in_use(pair.b),
        "import records on B": pair.b.ssh("ls", IMPORTS_DIR, check=False).stdout,
        "stick on B": pair.b.kernel_device(serial=SERIAL) is not None,
        "guest XML": pair.b.ssh("virsh", "-q", "-c", "qemu:///system", "dumpxml", "--inactive", GUEST).stdout,
    }


def wait_in_guest_b(pair: LinkedPair, before: tuple[int, int] | None = None, timeout: float = 180.0) -> tuple[int, int]:
    """Wait until B's guest holds the imported stick at its current address on B (a new one if ``before``)."""
    deadline = time.monotonic() + timeout
    while True:
        address = kernel_address(pair.b, SERIAL)
        if address is not None and address != before and bound_in_guest(pair.b, GUEST, SERIAL):
            return address
        if time.monotonic() > deadline:
            raise AssertionError(
                "the stick is not back in %s on B: B's kernel has it at %s (was %s), the guest sees %s"
                % (GUEST, address, before, pair.b.guest_usb(GUEST))
            )
        time.sleep(2)


def wait_gone_from_b(pair: LinkedPair, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while pair.b.kernel_device(serial=SERIAL) is not None:
        if time.monotonic() > deadline:
            raise AssertionError("the imported stick is still on B: %s" % vhci_ports_in_use(pair.b))
        time.sleep(1)


def unload_usbip(pair: LinkedPair) -> None:
    """Unload the USB/IP modules a smoke test loaded: the collection's path then starts from fresh hosts."""
    pair.a.ssh("modprobe", "-r", "usbip-host")
    pair.b.ssh("modprobe", "-r", "vhci-hcd")


# The harness itself: the link, and the stock kernel's USB/IP driven by Debian's usbip tools.


def test_link_and_stock_usbip_carry_the_stick(pair: LinkedPair) -> None:
    assert read_marker(pair.a) == MARKER
    port = stick_port(pair)
    pair.a.ssh("modprobe", "usbip-host")
    pair.b.ssh("modprobe", "vhci-hcd")
    pair.a.ssh("usbipd", "--daemon", "--pid=/run/smoke-usbipd.pid")
    try:
        pair.a.ssh("usbip", "bind", "--busid", port)
        assert driver_of(pair.a, port) == "usbip-host"
        listed = pair.b.ssh("usbip", "list", "--remote", pair.a_address).stdout
        assert port + ": " in listed and "46f4:0001" in listed, listed
        pair.b.ssh("usbip", "attach", "--remote", pair.a_address, "--busid", port)
        pair.b.wait_usb(lambda devices: any(device["serial"] == SERIAL for device in devices), timeout=60)
        assert read_marker(pair.b) == MARKER
        for vhci_port in vhci_ports_in_use(pair.b):
            pair.b.ssh("usbip", "detach", "--port", str(int(vhci_port)))
        wait_gone_from_b(pair)
    finally:
        pair.a.ssh("usbip", "unbind", "--busid", port, check=False)
        pair.a.ssh("sh", "-c", "kill $(cat /run/smoke-usbipd.pid)", check=False)
    pair.a.wait_usb(lambda devices: driver_of(pair.a, port) == "usb", timeout=30)
    assert vhci_ports_in_use(pair.b) == []
    unload_usbip(pair)


def test_the_collections_exporter_and_importer_carry_the_stick_and_refuse_a_stranger(pair: LinkedPair) -> None:
    """_usbip as it is, below the roles: the runtime's exporter run by hand on A, ensure_import / release_import on B."""
    for host in (pair.a, pair.b):
        ship_runtime(host, SMOKE_PROGRAM)
    pair.a.ssh("modprobe", "usbip-host")
    pair.b.ssh("modprobe", "vhci-hcd")
    table = {"listen": pair.a_address, "port": USBIP_PORT, "exports": [
        {"id": STICK, "selector": {"id": STICK}, "importer": B_NAME, "importer_address": pair.b_address, "domain": GUEST}]}
    pair.a.ssh("sh", "-c", "cat > %s/exports.json" % SMOKE_DIR, input=json.dumps(table))
    pair.a.ssh("systemd-run", "--unit", SMOKE_UNIT, "--", "python3", SMOKE_PROGRAM, "exporter", "serve", "--exports", SMOKE_DIR + "/exports.json")
    port = stick_port(pair)
    try:
        pair.a.wait_usb(lambda devices: driver_of(pair.a, port) == "usbip-host", timeout=30)
        ensure = "ensure_import(%r, %r, {'id': %r}, port=%d)" % (A_NAME, pair.a_address, STICK, USBIP_PORT)
        record = json.loads(pair.b.ssh("python3", "-c", CALL_IMPORTER % (SMOKE_PROGRAM, ensure)).stdout)
        assert (record["host"], record["busid"], record["id"]) == (A_NAME, port, STICK), record
        assert read_marker(pair.b) == MARKER
        assert pair.probe(STRANGER_ADDRESS)["outcome"] == "closed"
        assert pair.probe(pair.b_address)["outcome"] == "answered"
        release = "release_import(%r, %r, {'id': %r}, port=%d)" % (A_NAME, pair.a_address, STICK, USBIP_PORT)
        assert json.loads(pair.b.ssh("python3", "-c", CALL_IMPORTER % (SMOKE_PROGRAM, release)).stdout) is True
        wait_gone_from_b(pair)
        lines = pair.a.ssh("journalctl", "-u", SMOKE_UNIT, "-o", "cat", "--no-pager").stdout.splitlines()
        assert "refused connection from %s: no export is declared for it" % STRANGER_ADDRESS in lines, lines
        assert len([line for line in lines if line.startswith("exported %s (%s) to %s" % (port, STICK, B_NAME))]) == 1, lines
    finally:
        pair.a.ssh("systemctl", "stop", SMOKE_UNIT, check=False)
        pair.a.ssh("usbip", "unbind", "--busid", port, check=False)
    pair.a.wait_usb(lambda devices: driver_of(pair.a, port) == "usb", timeout=30)
    assert vhci_ports_in_use(pair.b) == []
    unload_usbip(pair)


# The collection's path: converge over both hosts.


def test_check_mode_says_what_it_would_do_on_each_host_and_changes_nothing(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    before = state(pair)
    checked = converge(pair, tmp_path, declared(), "--check", "--diff")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.changed[A_NAME] > 0 and checked.changed[B_NAME] > 0, checked.stdout
    assert STICK in checked.stdout and B_NAME in checked.stdout, checked.stdout
    assert state(pair) == before


def test_converge_exports_imports_and_the_marker_reads_back_on_b(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    done = converge(pair, tmp_path, declared())
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.failed[A_NAME], done.failed[B_NAME]) == (0, 0)
    assert done.changed[A_NAME] > 0 and done.changed[B_NAME] > 0, done.stdout
    assert driver_of(pair.a, stick_port(pair)) == "usbip-host"
    exports = json.loads(pair.a.ssh("cat", EXPORTS).stdout)
    [export] = exports["exports"]
    assert (export["id"], export["importer"], export["domain"]) == (STICK, B_NAME, GUEST)
    assert export["importer_address"] == pair.b_address
    # The guest is not running: the stick is a local USB device of B, read there through the import.
    pair.b.wait_usb(lambda devices: any(device["serial"] == SERIAL for device in devices), timeout=90)
    assert len(vhci_ports_in_use(pair.b)) == 1
    assert read_marker(pair.b) == MARKER


def test_the_started_guest_takes_the_imported_stick(pair: LinkedPair, guest_b: str) -> None:
    pair.b.ssh("virsh", "-q", "-c", "qemu:///system", "start", guest_b)
    wait_in_guest_b(pair)
    [seen] = [device for device in pair.b.guest_usb(guest_b) if device["host"]]
    assert seen["product"] == "QEMU USB HARDDRIVE"


def test_usb_facts_show_the_export_on_a_and_the_import_on_b(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    inventory = pair.inventory(tmp_path, declared())
    on_a = run_module_on(inventory, A_NAME, "kvmhost.usb.usb_facts")
    [stick_a] = [device for device in on_a["ansible_facts"]["usb_devices"] if device.get("serial") == SERIAL]
    assert stick_a["exported_to"]["host"] == B_NAME and stick_a["exported_to"]["domain"] == GUEST, stick_a
    on_b = run_module_on(inventory, B_NAME, "kvmhost.usb.usb_facts")
    [stick_b] = [device for device in on_b["ansible_facts"]["usb_devices"] if device.get("serial") == SERIAL]
    assert stick_b["imported_from"]["host"] == A_NAME, stick_b
    assert stick_b["imported_from"]["link_address"] == pair.a_address, stick_b


def test_second_converge_changes_nothing(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    again = converge(pair, tmp_path, declared())
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.changed == {A_NAME: 0, B_NAME: 0}, again.stdout


# It holds by itself: each disturbance ends with the stick back in B's guest, nobody acting.


def disturbed(pair: LinkedPair, action) -> tuple[list[str], list[str]]:
    """Run ``action``, wait until the stick is back in B's guest; the new exporter lines on A and agent lines on B."""
    wait_in_guest_b(pair)
    exporter_start, agent_start = len(exporter_journal(pair.a)), len(agent_journal(pair.b))
    before = kernel_address(pair.b, SERIAL)
    action()
    wait_in_guest_b(pair, before)
    return exporter_journal(pair.a)[exporter_start:], agent_journal(pair.b)[agent_start:]


def test_replug_on_a_comes_back_in_the_guest_on_b(pair: LinkedPair, guest_b: str) -> None:
    exporter, agent = disturbed(pair, lambda: pair.a.replug("stick"))
    assert [line for line in exporter if re.search(r"\bexport", line) and stick_port(pair) in line], exporter
    assert [line for line in agent if "import" in line and A_NAME in line], agent
    assert [line for line in agent if line.startswith("attached %s" % STICK)], agent


def test_guest_restart_on_b_gets_the_stick_back(pair: LinkedPair, guest_b: str) -> None:
    def restart() -> None:
        pair.b.ssh("virsh", "-q", "-c", "qemu:///system", "destroy", guest_b)
        pair.b.ssh("virsh", "-q", "-c", "qemu:///system", "start", guest_b)

    wait_in_guest_b(pair)
    agent_start = len(agent_journal(pair.b))
    restart()
    deadline = time.monotonic() + 120
    while not bound_in_guest(pair.b, guest_b, SERIAL):
        assert time.monotonic() < deadline, "the stick is not back in the restarted guest: %s" % pair.b.guest_usb(guest_b)
        time.sleep(2)
    # The import stood throughout, so libvirt gives the restarted guest the stick from its persistent hostdev; the
    # agent acts (one line) only if the guest came up without it, and never fails on the way.
    lines = agent_journal(pair.b)[agent_start:]
    assert len([line for line in lines if line.startswith("attached %s to %s" % (STICK, guest_b))]) <= 1, lines
    assert not [line for line in lines if line.startswith("cannot")], lines


@pytest.mark.parametrize("side", ["exporter on A", "agent on B"])
def test_service_restart_on_either_host_gets_the_stick_back(pair: LinkedPair, guest_b: str, side: str) -> None:
    host, unit = (pair.a, EXPORTER_UNIT) if side == "exporter on A" else (pair.b, AGENT_UNIT)
    wait_in_guest_b(pair)
    started = host.ssh("systemctl", "show", "--property=InvocationID", "--value", unit).stdout.strip()
    host.ssh("systemctl", "restart", unit)
    assert host.ssh("systemctl", "show", "--property=InvocationID", "--value", unit).stdout.strip() != started
    wait_in_guest_b(pair)
    assert read_guest_product(pair) == "QEMU USB HARDDRIVE"


def read_guest_product(pair: LinkedPair) -> str:
    [seen] = [device for device in pair.b.guest_usb(GUEST) if device["host"] and device["host"]["attached"]]
    return seen["product"]


def test_link_cut_for_ten_seconds_ends_with_the_stick_back(pair: LinkedPair, guest_b: str) -> None:
    wait_in_guest_b(pair)
    pair.set_link(False)
    try:
        assert not pair.reaches()
        time.sleep(10)
    finally:
        pair.set_link(True)
    pair.wait_link()
    wait_in_guest_b(pair)
    assert read_guest_product(pair) == "QEMU USB HARDDRIVE"


def test_connection_from_another_address_is_refused(pair: LinkedPair, guest_b: str) -> None:
    start = len(exporter_journal(pair.a))
    stranger = pair.probe(STRANGER_ADDRESS)
    assert stranger["outcome"] in ("refused", "closed"), stranger
    # The same probe from B's declared address is answered: the refusal is the exporter's choice, not the link's.
    declared_peer = pair.probe(pair.b_address)
    assert declared_peer["outcome"] == "answered", declared_peer
    if stranger["outcome"] == "closed":
        assert [line for line in exporter_journal(pair.a)[start:] if STRANGER_ADDRESS in line and "refused" in line]
    wait_in_guest_b(pair)


# Taking it back.


def test_dropping_it_from_the_declaration_removes_export_and_import(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    done = converge(pair, tmp_path, declared(devices=[]))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_gone_from_b(pair)
    assert vhci_ports_in_use(pair.b) == []
    assert pair.b.ssh("ls", IMPORTS_DIR, check=False).stdout.strip() == ""
    assert json.loads(pair.a.ssh("cat", EXPORTS).stdout)["exports"] == []
    pair.a.wait_usb(lambda devices: driver_of(pair.a, stick_port(pair)) == "usb", timeout=30)
    assert not [device for device in pair.b.guest_usb(guest_b) if device["host"]]


def test_usb_detach_ad_hoc_removes_export_and_import(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    done = converge(pair, tmp_path, declared())
    assert done.returncode == 0, done.stdout + done.stderr
    wait_in_guest_b(pair)
    inventory = pair.inventory(tmp_path, {})
    result = run_module_on(inventory, B_NAME, "kvmhost.usb.usb_detach", {"domain": guest_b, "devices": [{"host": A_NAME, "id": STICK}]})
    assert not result["failed"] and result["changed"], result
    wait_gone_from_b(pair)
    assert vhci_ports_in_use(pair.b) == []
    assert not [device for device in pair.b.guest_usb(guest_b) if device["host"]]
    assert json.loads(pair.a.ssh("cat", EXPORTS).stdout)["exports"] == []
    pair.a.wait_usb(lambda devices: driver_of(pair.a, stick_port(pair)) == "usb", timeout=30)


# Bad input: a clear error, nothing changed on either host.


@pytest.mark.parametrize(
    "devices, message",
    [
        ([{"host": "kvm9", "id": STICK}], r"kvm9.*not in the inventory"),
        ([{"host": A_NAME, "id": "46f4:0001:NOPE0001"}], r"No USB device matches \(id=46f4:0001:NOPE0001\)"),
    ],
    ids=["unknown host", "device absent on A"],
)
def test_bad_input_fails_clearly_and_changes_nothing(pair: LinkedPair, guest_b: str, tmp_path, devices, message) -> None:
    before = state(pair)
    failed = converge(pair, tmp_path, declared(devices=devices))
    assert failed.returncode != 0
    assert re.search(message, failed.stdout, re.S | re.I), failed.stdout
    assert state(pair) == before


def test_device_held_by_a_local_domain_on_a_fails_naming_it(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    with pair.a.running_guest(LOCAL_GUEST):
        inventory = pair.inventory(tmp_path, {})
        held = run_module_on(inventory, A_NAME, "kvmhost.usb.usb_attach", {"domain": LOCAL_GUEST, "devices": [STICK]})
        assert not held["failed"], held
        before = state(pair)
        failed = converge(pair, tmp_path, declared())
        assert failed.returncode != 0
        assert re.search(r"%s.*%s|%s.*%s" % (A_NAME, LOCAL_GUEST, LOCAL_GUEST, A_NAME), failed.stdout), failed.stdout
        assert state(pair) == before
