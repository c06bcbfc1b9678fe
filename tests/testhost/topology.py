"""The USB devices of a test host, declared in a small YAML file.

Example (``topologies/default.yml`` is the default)::

    controller: {ports: 8}                        # optional, qemu-xhci's port count
    devices:
      - {id: stick, kind: storage, serial: KING0001, port: 1}
      - {id: tablet, kind: tablet, port: 1}
      - id: hub
        kind: hub
        port: 3
        devices:                                  # behind the hub, on its port 1: QEMU port 3.1
          - {id: serial0, kind: serial, port: 1}

``id`` names the device for QMP (plug/unplug/replug). ``kind`` is one of KINDS. ``port``
is the port number on the controller or, nested under a hub, on that hub. Each xHCI port
is a USB 3 connector: the test-host kernel sees a USB 3 device there (storage) on bus 2,
any other on bus 1, so QEMU port 1 is either 1-1 or 2-1 (``Topology.linux_port``). Optional:
``serial`` (else QEMU's built-in one), ``size_mib`` for storage (default 16), and
``plugged: false`` for a device that is declared but only plugged later through QMP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from .paths import TOPOLOGIES_DIR

# kind -> QEMU device driver. All HID kinds report 0627:0001, storage 46f4:0001,
# serial 0403:6001 (FTDI), hub 0409:55aa.
KINDS = {
    "storage": "usb-storage",
    "keyboard": "usb-kbd",
    "tablet": "usb-tablet",
    "mouse": "usb-mouse",
    "serial": "usb-serial",
    "hub": "usb-hub",
}
DEFAULT = os.path.join(TOPOLOGIES_DIR, "default.yml")
CONTROLLER_ID = "xhci"


@dataclass
class Device:
    """One emulated USB device of the test host."""

    id: str
    kind: str
    port: str
    serial: str | None = None
    size_mib: int = 16
    plugged: bool = True
    hub: str | None = None

    @property
    def driver(self) -> str:
        return KINDS[self.kind]

    @property
    def backend(self) -> str | None:
        """The block node (storage) or chardev (serial) the device needs, named after it."""
        if self.kind in ("storage", "serial"):
            return self.id + "-backend"
        return None

    def qemu_properties(self, port: str | None = None) -> dict[str, Any]:
        """The device's properties for ``-device`` and QMP ``device_add``."""
        properties: dict[str, Any] = {"driver": self.driver, "id": self.id, "bus": CONTROLLER_ID + ".0", "port": port or self.port}
        if self.serial is not None:
            properties["serial"] = self.serial
        if self.kind == "storage":
            properties["drive"] = self.backend
            properties["removable"] = True
        elif self.kind == "serial":
            properties["chardev"] = self.backend
        return properties


@dataclass
class Topology:
    """The controller and the devices of a test host, hubs before the devices behind them."""

    devices: list[Device] = field(default_factory=list)
    ports: int = 8
    source: str = ""

    def device(self, device_id: str) -> Device:
        for device in self.devices:
            if device.id == device_id:
                return device
        raise KeyError("no device %r in the topology %s" % (device_id, self.source))

    def linux_port(self, device_id: str, qemu_port: str | None = None) -> str:
        """The test-host kernel's port path of a device (at its declared port or ``qemu_port``).

        qemu-xhci registers its USB 2 root hub first (bus 1), its USB 3 root hub second
        (bus 2); only storage is a USB 3 device, and only when not behind a (USB 2) hub.
        """
        device = self.device(device_id)
        port = qemu_port or device.port
        bus = 2 if device.kind == "storage" and "." not in port else 1
        return "%d-%s" % (bus, port)


def load(path: str | None = None) -> Topology:
    """Read a topology YAML file (the default one without a path)."""
    path = path or DEFAULT
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    controller = data.get("controller") or {}
    topology = Topology(ports=int(controller.get("ports", 8)), source=path)
    if not 1 <= topology.ports <= 15:
        raise ValueError("%s: controller ports must be 1..15, not %d" % (path, topology.ports))
    _add_devices(topology, data.get("devices") or [], parent=None)
    _check(topology)
    return topology


def _add_devices(topology: Topology, entries: list[dict[str, Any]], parent: Device | None) -> None:
    for entry in entries:
        unknown = set(entry) - {"id", "kind", "port", "serial", "size_mib", "plugged", "devices"}
        if unknown:
            raise ValueError("%s: unknown key(s) %s in device %r" % (topology.source, ", ".join(sorted(unknown)), entry))
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError("%s: device %r has kind %r; expected one of %s" % (topology.source, entry.get("id"), kind, ", ".join(KINDS)))
        if "id" not in entry or "port" not in entry:
            raise ValueError("%s: every device needs an id and a port: %r" % (topology.source, entry))
        port = str(entry["port"])
        device = Device(
            id=str(entry["id"]),
            kind=kind,
            port="%s.%s" % (parent.port, port) if parent else port,
            serial=None if entry.get("serial") is None else str(entry["serial"]),
            size_mib=int(entry.get("size_mib", 16)),
            plugged=bool(entry.get("plugged", True)) and (parent.plugged if parent else True),
            hub=parent.id if parent else None,
        )
        topology.devices.append(device)
        if entry.get("devices"):
            if kind != "hub":
                raise ValueError("%s: only a hub can have devices behind it, not %r" % (topology.source, device.id))
            _add_devices(topology, entry["devices"], parent=device)


def _check(topology: Topology) -> None:
    ids = [device.id for device in topology.devices]
    ports = [device.port for device in topology.devices]
    for values, what in ((ids, "id"), (ports, "port")):
        duplicates = sorted({value for value in values if values.count(value) > 1})
        if duplicates:
            raise ValueError("%s: duplicate device %s(s): %s" % (topology.source, what, ", ".join(duplicates)))
    for device in topology.devices:
        for number in device.port.split("."):
            if not number.isdigit():
                raise ValueError("%s: device %r has the malformed port %r" % (topology.source, device.id, device.port))
        root = int(device.port.split(".")[0])
        if not 1 <= root <= topology.ports:
            raise ValueError("%s: device %r is on port %s; the controller has ports 1..%d" % (topology.source, device.id, root, topology.ports))
        if device.hub is not None and not 1 <= int(device.port.rsplit(".", 1)[1]) <= 8:
            raise ValueError("%s: device %r is on hub port %s; a hub has ports 1..8" % (topology.source, device.id, device.port))
