"""Two test hosts booted together and linked to each other over loopback, for USB passthrough across hosts.

    with LinkedPair("mytest", marker="...") as pair:   # boots A, then B
        pair.a.ssh("lsusb")                             # A has the stick (serial KING0001), MARKER file on it
        pair.reaches()                                  # B reaches A's sshd over the link (eth1)
        pair.set_link(False)                            # cut the link (QMP set_link on A's link NIC)
        pair.inventory(directory, {"kvm2": {...}})      # an Ansible inventory with both hosts

Each host has its usual user-mode NIC for SSH and a second NIC (eth1) on a private link: a QEMU socket
netdev, listening on 127.0.0.1:PORT on A and connected to it from B (a free port per run), with the
addresses 10.77.0.1 (A) and 10.77.0.2 (B). Both run with 1 vCPU and 1 GiB so that two fit on a 2-core
machine; they boot one after the other.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import yaml

from .host import Link, TestHost, _free_port
from .paths import TOPOLOGIES_DIR, log

A_TOPOLOGY = os.path.join(TOPOLOGIES_DIR, "crosshost-a.yml")
B_TOPOLOGY = os.path.join(TOPOLOGIES_DIR, "crosshost-b.yml")
A_ADDRESS = "10.77.0.1"
B_ADDRESS = "10.77.0.2"
# The second address on B's link: not declared for anything, so A's exporter must refuse it.
STRANGER_ADDRESS = "10.77.0.3"
A_NAME = "kvm1"
B_NAME = "kvm2"
USBIP_PORT = 3240
MARKER_FILE = "MARKER"

# Run on B: whether A's sshd answers over the link within the timeout (the image has no ping).
REACHES = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 22), timeout=float(sys.argv[2])).close()
except OSError:
    sys.exit(1)
"""

# Run on B: connect to A's USB/IP port from a given source address and ask for the device list
# (OP_REQ_DEVLIST, protocol 1.1.1), as ``usbip list -r`` does. Prints what happened, as JSON.
PROBE = r"""
import json, socket, struct, sys
source, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket()
sock.settimeout(10)
sock.bind((source, 0))
try:
    sock.connect((address, port))
except ConnectionRefusedError:
    print(json.dumps({"outcome": "refused"})); sys.exit()
except OSError as error:
    print(json.dumps({"outcome": "unreachable", "error": str(error)})); sys.exit()
try:
    sock.sendall(struct.pack(">HHI", 0x0111, 0x8005, 0))
    reply = b""
    while len(reply) < 12:
        chunk = sock.recv(12 - len(reply))
        if not chunk:
            break
        reply += chunk
except (ConnectionResetError, BrokenPipeError):
    reply = b""
except socket.timeout:
    print(json.dumps({"outcome": "no answer"})); sys.exit()
if len(reply) < 12:
    print(json.dumps({"outcome": "closed"}))
else:
    version, code, status, count = struct.unpack(">HHII", reply)
    print(json.dumps({"outcome": "answered", "status": status, "devices": count}))
"""


class LinkedPair:
    """Host A (the stick, with ``marker`` in its MARKER file) and host B, linked as 10.77.0.1 and 10.77.0.2."""

    def __init__(self, prefix: str, marker: str = "", a_topology: str = A_TOPOLOGY, b_topology: str = B_TOPOLOGY) -> None:
        port = _free_port()
        self.marker = marker
        self.a = TestHost(
            prefix + "-a", a_topology, memory_mib=1024, cpus=1,
            link=Link(A_ADDRESS, "52:54:00:77:00:01", port, listen=True), stick_files={MARKER_FILE: marker},
        )
        self.b = TestHost(prefix + "-b", b_topology, memory_mib=1024, cpus=1, link=Link(B_ADDRESS, "52:54:00:77:00:02", port, listen=False))
        self.a_address = A_ADDRESS
        self.b_address = B_ADDRESS

    def __enter__(self) -> LinkedPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    @property
    def hosts(self) -> dict[str, TestHost]:
        """The two test hosts by their inventory names."""
        return {A_NAME: self.a, B_NAME: self.b}

    def start(self) -> LinkedPair:
        """Boot A (it listens on the link), then B (it connects); wait until B reaches A over the link."""
        started = time.monotonic()
        try:
            self.a.start()
            self.b.start()
            self.wait_link()
        except BaseException:
            self.remove()
            raise
        log("linked test hosts up after %.0f s" % (time.monotonic() - started))
        return self

    def remove(self) -> None:
        self.b.remove()
        self.a.remove()

    def wait_link(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        # A's address (and B's again, idempotently: set at boot by kvmhost-link.service) now that B is connected.
        for host in (self.a, self.b):
            host.ssh("ip", "link", "set", "eth1", "up")
            host.ssh("ip", "address", "replace", host.link.address + "/24", "dev", "eth1")
        while not self.reaches():
            if time.monotonic() > deadline:
                raise TimeoutError("B does not reach A over the link\n%s" % "\n".join(self._link_report(host) for host in (self.a, self.b)))
            time.sleep(1)

    def reaches(self, timeout: float = 2.0) -> bool:
        """Whether B reaches A over the link: A's sshd answers a TCP connection to its link address."""
        return self.b.ssh("python3", "-", self.a_address, str(timeout), input=REACHES, check=False).returncode == 0

    @staticmethod
    def _link_report(host: TestHost) -> str:
        with host.qmp() as connection:
            network = connection.execute("human-monitor-command", **{"command-line": "info network"})
        return "%s: %s%s" % (host.name, host.ssh("ip", "-s", "address", "show", "eth1", check=False).stdout, network)

    def set_link(self, up: bool) -> None:
        """Cut (or restore) the link: QMP set_link on A's link NIC, as if its cable were pulled."""
        with self.a.qmp() as connection:
            connection.execute("set_link", name=Link.NETDEV + "-nic", up=up)

    def probe(self, source: str, port: int = USBIP_PORT, address: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """From B, bound to ``source``, ask A's USB/IP port at ``address`` (its link address unless given) for its
        device list. ``source`` is an address of B's link (added if missing), or of B's tunnel; with ``namespace``, the
        probe runs in that network namespace of B. ``outcome``: refused, closed (accepted, then closed without an
        answer), answered (with ``devices``), unreachable or no answer."""
        command = ["python3", "-", source, address or self.a_address, str(port)]
        if namespace:
            command = ["ip", "netns", "exec", namespace] + command
        elif source.startswith(self.a_address.rsplit(".", 1)[0] + "."):
            if " %s/" % source not in self.b.ssh("ip", "-o", "-4", "address", "show", "eth1").stdout:
                self.b.ssh("ip", "address", "add", source + "/24", "dev", "eth1")
        result = self.b.ssh(*command, input=PROBE)
        return json.loads(result.stdout)

    def inventory(self, directory: str | os.PathLike, hostvars: dict[str, dict[str, Any]] | None = None) -> str:
        """An Ansible inventory with both hosts (kvm1 = A, kvm2 = B), each with its connection and
        ``usb_link_address``, plus ``hostvars[name]``; written to ``directory``, its path returned."""
        hosts = {}
        for name, host in self.hosts.items():
            hosts[name] = dict(host.connection_vars(), usb_link_address=host.link.address)
            hosts[name].update((hostvars or {}).get(name, {}))
        path = os.path.join(directory, "inventory.yml")
        with open(path, "w") as handle:
            yaml.safe_dump({"all": {"hosts": hosts}}, handle, default_flow_style=False)
        return path
