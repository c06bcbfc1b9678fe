"""A minimal QMP client for the test host's QEMU: plug, unplug and replug USB devices.

    with QMP(host.qmp_socket) as qmp:
        qmp.unplug("stick")                 # pulls the stick out, waits for DEVICE_DELETED
        qmp.plug(host.topology.device("stick"), port="6")   # puts it into another port

These act on the emulated hardware only; wait for the test host's kernel to see the change
with ``TestHost.wait_usb``.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from .topology import Device


class QMPError(RuntimeError):
    """QEMU answered a command with an error."""


class QMP:
    """One QMP connection (capabilities negotiated); events are kept until waited for."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = self.sock.makefile("r", encoding="utf-8")
        self.events: list[dict[str, Any]] = []
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def _read(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise QMPError("QEMU closed the QMP connection")
        return json.loads(line)

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run a QMP command and return its result; raise QMPError on an error answer."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QMPError("%s: %s" % (command, reply["error"].get("desc", reply["error"])))
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float = 30.0, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data`` (already received or still to come)."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                    self.events.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no QMP event %s %s within %.0f s" % (name, data, timeout))
            self.sock.settimeout(remaining)
            try:
                self.events.append(self._read())
            except socket.timeout:
                pass

    def usb_device_ids(self) -> list[str]:
        """Ids of the devices on the xHCI controller's bus, as QEMU sees them."""
        return [
            child["name"]
            for child in self.execute("qom-list", path="/machine/peripheral")
            if child["type"].startswith("child<usb-")
        ]

    def ensure_backend(self, device: Device, run_dir: str) -> None:
        """Create the block node or chardev a storage or serial device needs, unless it exists."""
        if device.kind == "storage":
            nodes = [node["node-name"] for node in self.execute("query-named-block-nodes")]
            if device.backend not in nodes:
                self.execute("blockdev-add", **storage_backend(device, run_dir))
        elif device.kind == "serial":
            chardevs = [chardev["label"] for chardev in self.execute("query-chardev")]
            if device.backend not in chardevs:
                self.execute("chardev-add", id=device.backend, backend={"type": "ringbuf", "data": {}})

    def plug(self, device: Device, port: str | None = None) -> None:
        """Plug a device in (at its declared port, or at ``port`` such as ``"2"`` or ``"3.2"``)."""
        self.execute("device_add", **device.qemu_properties(port))

    def unplug(self, device_id: str, timeout: float = 30.0) -> None:
        """Pull a device out and wait until QEMU reports it gone (DEVICE_DELETED)."""
        self.execute("device_del", id=device_id)
        self.wait_event("DEVICE_DELETED", timeout=timeout, device=device_id)

    def replug(self, device: Device, port: str | None = None, pause: float = 0.5) -> None:
        """Unplug, wait ``pause`` seconds as a person would, and plug in again (optionally elsewhere)."""
        self.unplug(device.id)
        time.sleep(pause)
        self.plug(device, port)


def storage_backend(device: Device, run_dir: str) -> dict[str, Any]:
    """The ``-blockdev`` / ``blockdev-add`` description of a storage device's image file."""
    return {
        "driver": "raw",
        "node-name": device.backend,
        "file": {"driver": "file", "filename": storage_image(device, run_dir)},
    }


def storage_image(device: Device, run_dir: str) -> str:
    return "%s/%s.img" % (run_dir, device.id)
