"""A USB device on one host, used by a guest on another (USB/IP): two test hosts booted together and linked
over loopback (tests/testhost/pair.py), converged by the kvmhost.usb.converge playbook over both.

Host A (kvm1, 10.77.0.1) has the stick KING0001, with a marker file written into its image on the outer
side before boot; host B (kvm2, 10.77.0.2) has no USB device and a nested guest that declares the stick
with ``host: kvm1``. The converge links them with WireGuard (the default): their tunnel addresses, derived from the
link addresses, are 10.213.0.1 and 10.213.0.2. The tests run in order on one boot of the pair and share its state: each leaves the
stick declared for and held by B's guest, until the ones that take it back and the bad input at the end.
The two-host tests live in this module of their own: they are the longest of the real-USB tier.
"""

from __future__ import annotations

import json
import os
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
TUNNEL = "kvmhost-usb"
A_TUNNEL = "10.213.0.1"
B_TUNNEL = "10.213.0.2"
LINK_KEY = "/etc/kvmhost-usb/link.key"
WIREGUARD_PORT = 51871
CAPTURE = "/root/link.pcap"
IMPOSTOR = "impostor"

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


def public_key(host: TestHost) -> str:
    return host.ssh("wg", "show", TUNNEL, "public-key").stdout.strip()


def peers(host: TestHost) -> list[str]:
    """The public keys of the peers of the host's tunnel; None when it has no tunnel."""
    shown = host.ssh("wg", "show", TUNNEL, "peers", check=False)
    return shown.stdout.split() if shown.returncode == 0 else None


def private_key(host: TestHost) -> str:
    return host.ssh("cat", LINK_KEY).stdout.strip()


def state(pair: LinkedPair) -> dict[str, Any]:
    """What a run must not change on either host when it fails or runs in check mode."""
    return {
        "tunnel peers": [peers(pair.a), peers(pair.b)],
        "link keys": [host.ssh("ls", "-l", "--time-style=+", LINK_KEY, check=False).stdout for host in (pair.a, pair.b)],
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


def test_converge_exports_imports_and_the_marker_reads_back_on_b_through_the_tunnel_alone(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    done = converge(pair, tmp_path, declared())
    assert done.returncode == 0, done.stdout + done.stderr
    assert (done.failed[A_NAME], done.failed[B_NAME]) == (0, 0)
    assert done.changed[A_NAME] > 0 and done.changed[B_NAME] > 0, done.stdout
    assert "share USB devices in clear text" not in done.stdout
    assert driver_of(pair.a, stick_port(pair)) == "usbip-host"
    exports = json.loads(pair.a.ssh("cat", EXPORTS).stdout)
    [export] = exports["exports"]
    assert (export["id"], export["importer"], export["domain"]) == (STICK, B_NAME, GUEST)
    assert (exports["listen"], export["importer_address"]) == (A_TUNNEL, B_TUNNEL)
    # Each tunnel has exactly the other host as its peer.
    assert (peers(pair.a), peers(pair.b)) == ([public_key(pair.b)], [public_key(pair.a)])
    # The guest is not running: the stick is a local USB device of B, read there through the import, while A
    # captures what crosses its link: WireGuard's UDP only, never USB/IP's TCP nor the marker's bytes.
    pair.b.wait_usb(lambda devices: any(device["serial"] == SERIAL for device in devices), timeout=90)
    assert len(vhci_ports_in_use(pair.b)) == 1
    pair.a.ssh("systemd-run", "--unit", "link-capture", "--", "tcpdump", "-i", "eth1", "-U", "-w", CAPTURE)
    try:
        time.sleep(2)
        pair.b.ssh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        assert read_marker(pair.b) == MARKER
        time.sleep(2)
    finally:
        pair.a.ssh("systemctl", "stop", "link-capture")
    usbip = pair.a.ssh("tcpdump", "-nn", "-r", CAPTURE, "tcp port %d" % USBIP_PORT).stdout.splitlines()
    wireguard = pair.a.ssh("tcpdump", "-nn", "-r", CAPTURE, "udp port %d" % WIREGUARD_PORT).stdout.splitlines()
    assert usbip == [] and len(wireguard) > 10, (usbip[:5], len(wireguard))
    captured = pair.a.ssh("python3", "-c", "import sys; print(open(sys.argv[1], 'rb').read().count(sys.argv[2].encode()))", CAPTURE, MARKER)
    assert captured.stdout.strip() == "0"


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
    assert stick_b["imported_from"]["link_address"] == A_TUNNEL, stick_b
    # kvmhost-usb status names the link's peer, as it does the export and the import.
    shown = json.loads(pair.a.ssh("kvmhost-usb", "status", "--json").stdout)
    assert shown["link"]["address"] == A_TUNNEL + "/16" and [peer["name"] for peer in shown["link"]["peers"]] == [B_NAME], shown["link"]
    assert "link      kvmhost-usb %s/16 to %s (%s, handshake at " % (A_TUNNEL, B_NAME, B_TUNNEL) in pair.a.ssh("kvmhost-usb", "status").stdout
    # The facts hold the link's public side at most, never a private key.
    gathered = json.dumps(on_a) + json.dumps(on_b)
    assert private_key(pair.a) not in gathered and private_key(pair.b) not in gathered


def test_second_converge_changes_nothing_and_no_private_key_leaves_its_host(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    again = converge(pair, tmp_path, declared(), "-vvv")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.changed == {A_NAME: 0, B_NAME: 0}, again.stdout
    for host in (pair.a, pair.b):
        assert host.ssh("stat", "-c", "%a %U %G", LINK_KEY).stdout.split() == ["600", "root", "root"]
        key = private_key(host)
        assert len(key) == 44 and key not in again.stdout and key not in again.stderr
        # The public key travels (it is what the peer is configured with); the private one stays.
        assert public_key(host) in again.stdout
    assert not [path for path in os.listdir(tmp_path) if private_key(pair.a) in open(os.path.join(tmp_path, path), errors="replace").read()]


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


def test_the_usbip_port_is_refused_outside_the_tunnel_and_answered_through_it(pair: LinkedPair, guest_b: str) -> None:
    start = len(exporter_journal(pair.a))
    # From B's own link address, and from a stranger's: A's link address does not take USB/IP at all (the exporter
    # listens on the tunnel address, and nftables resets the port on any other interface).
    for source in (pair.b_address, STRANGER_ADDRESS):
        outside = pair.probe(source)
        assert outside["outcome"] == "refused", (source, outside)
    assert pair.a.ssh("nft", "list", "table", "inet", "kvmhost_usb").stdout.count("reject with tcp reset") == 1
    # Through the tunnel, from B's tunnel address: answered.
    inside = pair.probe(B_TUNNEL, address=A_TUNNEL)
    assert inside["outcome"] == "answered" and inside["devices"] == 1, inside
    assert not [line for line in exporter_journal(pair.a)[start:] if "refused" in line]
    wait_in_guest_b(pair)


IMPOSTOR_UP = """
set -e
ip netns add {ns}
ip link add {ns}0 link eth1 type macvlan mode bridge
ip link set {ns}0 netns {ns}
ip address del {link}/24 dev eth1
ip -n {ns} address add {link}/24 dev {ns}0
ip -n {ns} link set {ns}0 up
ip -n {ns} link set lo up
ip -n {ns} link add wg0 type wireguard
wg genkey > /run/{ns}.key
ip netns exec {ns} wg set wg0 private-key /run/{ns}.key listen-port {port} \
    peer {peer_key} endpoint {peer_link}:{port} allowed-ips {peer_tunnel}/32 persistent-keepalive 1
ip -n {ns} address add {tunnel}/16 dev wg0
ip -n {ns} link set wg0 up
"""

IMPOSTOR_DOWN = """
ip netns del {ns}
rm -f /run/{ns}.key
ip address replace {link}/24 dev eth1
"""


def test_an_impostor_with_bs_addresses_but_not_its_key_gets_nothing(pair: LinkedPair, guest_b: str) -> None:
    """A network namespace on B takes B's link address (B gives it up meanwhile) and B's tunnel address, with a key of
    its own: it gets no handshake from A, so no device list and no import; B's own tunnel comes back after."""
    wait_in_guest_b(pair)
    values = dict(
        ns=IMPOSTOR, link=pair.b_address, tunnel=B_TUNNEL, port=WIREGUARD_PORT, peer_key=public_key(pair.a), peer_link=pair.a_address, peer_tunnel=A_TUNNEL
    )
    start = len(exporter_journal(pair.a))
    pair.b.ssh("sh", "-c", IMPOSTOR_UP.format(**values))
    try:
        # A learns the impostor's MAC for B's link address at once.
        pair.a.ssh("ip", "neigh", "flush", "dev", "eth1")
        through_tunnel = pair.probe(B_TUNNEL, address=A_TUNNEL, namespace=IMPOSTOR)
        on_the_link = pair.probe(pair.b_address, namespace=IMPOSTOR)
        handshakes = pair.b.ssh("ip", "netns", "exec", IMPOSTOR, "wg", "show", "wg0", "latest-handshakes").stdout.split()
    finally:
        pair.b.ssh("sh", "-c", IMPOSTOR_DOWN.format(**values))
        pair.a.ssh("ip", "neigh", "flush", "dev", "eth1")
    assert through_tunnel["outcome"] in ("no answer", "unreachable"), through_tunnel
    assert on_the_link["outcome"] == "refused", on_the_link
    assert handshakes == [public_key(pair.a), "0"], handshakes
    assert not [line for line in exporter_journal(pair.a)[start:] if line.startswith("exported")]
    # A still has B's real key, and B's tunnel and the stick come back.
    assert peers(pair.a) == [public_key(pair.b)]
    wait_in_guest_b(pair)


def test_rotated_keys_replace_the_old_ones_on_both_hosts_and_the_stick_stays(pair: LinkedPair, guest_b: str, tmp_path) -> None:
    wait_in_guest_b(pair)
    old = {A_NAME: public_key(pair.a), B_NAME: public_key(pair.b)}
    done = converge(pair, tmp_path, {B_NAME: dict(declared()[B_NAME], usb_link_rotate_keys=True), A_NAME: {"usb_link_rotate_keys": True}})
    assert done.returncode == 0, done.stdout + done.stderr
    new = {A_NAME: public_key(pair.a), B_NAME: public_key(pair.b)}
    assert new[A_NAME] != old[A_NAME] and new[B_NAME] != old[B_NAME]
    # The old keys are nowhere any more: each host knows its peer by the new key alone.
    assert (peers(pair.a), peers(pair.b)) == ([new[B_NAME]], [new[A_NAME]])
    wait_in_guest_b(pair)
    assert read_guest_product(pair) == "QEMU USB HARDDRIVE"


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
    # No device shared any more: neither host keeps a tunnel or A its firewall table; the keys stay for next time.
    assert (peers(pair.a), peers(pair.b)) == (None, None)
    assert pair.a.ssh("nft", "list", "table", "inet", "kvmhost_usb", check=False).returncode != 0
    assert pair.a.ssh("test", "-s", LINK_KEY).returncode == 0


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
