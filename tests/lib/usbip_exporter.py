"""A USB/IP exporter served in the test process: the collection's own ``_usbip.exporter.Exporter`` on 127.0.0.1, over a
directory laid out like the kernel's /sys/bus/usb (a stand-in: this machine has no USB kernel)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time

from tests.lib.modrun import collection_root

sys.path.insert(0, collection_root())

from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import exporter, table, wire  # noqa: E402

# The QEMU stick of the test host as the kernel describes it, field by field in the order of
# Documentation/usb/usbip_protocol.rst (struct usbip_usb_device, big endian).
STICK = {
    "path": "/sys/devices/pci0000:00/0000:00:1d.0/usb2/2-1",
    "busid": "2-1",
    "busnum": 2,
    "devnum": 3,
    "speed": wire.USB_SPEED_SUPER,
    "vendor_id": "46f4",
    "product_id": "0001",
    "bcd_device": 0x0000,
    "device_class": 0,
    "device_subclass": 0,
    "device_protocol": 0,
    "configuration_value": 1,
    "num_configurations": 1,
    "interfaces": [(0x08, 0x06, 0x50)],
}


def fake_sysfs(root, device):
    """A stand-in for /sys/bus/usb with one device already bound to usbip-host (this machine has no USB kernel)."""
    devices = root / "devices"
    base = devices / device["busid"]
    base.mkdir(parents=True)
    values = {
        "idVendor": device["vendor_id"],
        "idProduct": device["product_id"],
        "busnum": device["busnum"],
        "devnum": device["devnum"],
        "speed": "5000",
        "serial": "KING0001",
        "bcdDevice": "0000",
        "bDeviceClass": "00",
        "bDeviceSubClass": "00",
        "bDeviceProtocol": "00",
        "bConfigurationValue": "1",
        "bNumConfigurations": "1",
        "bNumInterfaces": " 1",
        "usbip_status": "1",
        "usbip_sockfd": "",
    }
    for name, value in values.items():
        (base / name).write_text("%s\n" % value)
    interface = base / ("%s:1.0" % device["busid"])
    interface.mkdir()
    for name, value in (("bInterfaceClass", "08"), ("bInterfaceSubClass", "06"), ("bInterfaceProtocol", "50")):
        (interface / name).write_text(value + "\n")
    driver = root / "drivers" / "usbip-host"
    driver.mkdir(parents=True)
    os.symlink(str(driver), str(base / "driver"))
    return base


def free_port():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return port


@contextlib.contextmanager
def serving(directory, exports, root):
    """The exporter serving ``exports`` from ``root`` on 127.0.0.1 (a free port), its table in ``directory``:
    ``(exporter, port, journal lines)``."""
    lines = []
    port = free_port()
    table.write_exports({"listen": "127.0.0.1", "port": port, "exports": exports}, str(directory / "exports.json"))
    served = exporter.Exporter(str(directory / "exports.json"), root=str(root), out=lines.append, state=str(directory / "exported.json"))
    served.reload_if_changed()
    served.listen()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            served.poll(0.1)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield served, port, lines
    finally:
        stop.set()
        thread.join()
        served.server.close()
        served.selector.close()


# The exporter's service loop (Exporter.run) with its defaults, in a process of its own; a test may shorten the interval
# of its refusal log (the 4th argument). pyudev is hidden from it, so that replugs are left to its periodic check: this
# machine's udev knows nothing of the stand-in tree.
PROCESS = """
import sys
sys.modules["pyudev"] = None
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import exporter
served = exporter.Exporter(sys.argv[1], root=sys.argv[2], state=sys.argv[3])
if sys.argv[4]:
    served.refusals.interval = float(sys.argv[4])
served.run()
"""


@contextlib.contextmanager
def serving_process(directory, exports, root, refusal_interval=None, timeout=30.0):
    """The exporter run as its service runs it, in a process of its own, serving ``exports`` from ``root`` on 127.0.0.1
    (a free port), its table in ``directory``: ``(process, port, path of its journal lines)``."""
    port = free_port()
    path = str(directory / "exports.json")
    table.write_exports({"listen": "127.0.0.1", "port": port, "exports": exports}, path)
    journal = directory / "exporter.log"
    env = dict(os.environ, PYTHONPATH=collection_root(), PYTHONUNBUFFERED="1")
    with open(str(journal), "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", PROCESS, path, str(root), str(directory / "exported.json"), str(refusal_interval or "")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + timeout
        while "listening on 127.0.0.1:%d" % port not in journal.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the exporter did not start listening: %s" % journal.read_text())
            time.sleep(0.05)
        yield process, port, journal
    finally:
        process.terminate()
        process.wait(timeout)
