"""Diskless libvirt guests inside the test host, and what they see on their USB bus.

A guest is ``<domain type='qemu'>`` (TCG), q35, a few MiB of RAM, a qemu-xhci controller,
no disk and no network: the firmware finds nothing to boot and idles, which is all a
USB passthrough test needs. It starts in seconds even under nested TCG.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .host import TestHost

DEFAULT_MEMORY_MIB = 32
GUEST_USB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest_usb.py")
URI = "qemu:///system"

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='qemu-xhci'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""

# "  Device 0.2, Port 1, Speed 480 Mb/s, Product QEMU USB HARDDRIVE, ID: hostdev0"
INFO_USB_LINE = re.compile(
    r"Device (?P<bus>\d+)\.(?P<address>\d+), Port (?P<port>[\d.]+), Speed (?P<speed>[\d.]+) Mb/s,"
    r" Product (?P<product>.*?)(?:, ID: (?P<id>\S+))?$"
)


def domain_xml(name: str, memory_mib: int = DEFAULT_MEMORY_MIB) -> str:
    return DOMAIN_XML.format(name=name, memory=memory_mib)


def virsh(host: TestHost, *argv: str, input: str | None = None, check: bool = True):
    return host.ssh("virsh", "-q", "-c", URI, *argv, input=input, check=check)


def create(host: TestHost, name: str, memory_mib: int = DEFAULT_MEMORY_MIB, start: bool = True) -> None:
    """Define the guest ``name`` in the test host's libvirt and start it unless ``start`` is false."""
    virsh(host, "define", "/dev/stdin", input=domain_xml(name, memory_mib))
    if start:
        virsh(host, "start", name)


def remove(host: TestHost, name: str) -> None:
    """Stop and undefine the guest; nothing happens if it does not exist."""
    virsh(host, "destroy", name, check=False)
    virsh(host, "undefine", name, check=False)


def parse_info_usb(text: str) -> list[dict[str, Any]]:
    """The devices of ``info usb``: bus, address, port, speed (Mb/s), product and QEMU id (libvirt's alias)."""
    devices = []
    for line in text.splitlines():
        match = INFO_USB_LINE.search(line.strip())
        if match:
            entry: dict[str, Any] = match.groupdict()
            entry["bus"] = int(entry["bus"])
            entry["address"] = int(entry["address"])
            entry["speed"] = float(entry["speed"])
            devices.append(entry)
    return devices


def usb(host: TestHost, name: str) -> list[dict[str, Any]]:
    """What the running guest ``name`` has on its USB buses, from its QEMU monitor.

    Each device: ``bus``, ``address``, ``port``, ``speed``, ``product``, ``id`` (libvirt's
    alias, such as hostdev0) as ``info usb`` prints them, and ``host`` for a passed-through
    host device: ``{"attached", "hostbus", "hostaddr", "hostdevice"}`` as the guest's QEMU
    holds it (None for an emulated device). QEMU notices a vanished host device only on I/O,
    so after a replug an idle guest still lists the device: compare ``host`` with
    ``TestHost.kernel_usb_devices()`` to see whether it is bound to the device now present.
    """
    with open(GUEST_USB_SCRIPT) as handle:
        script = handle.read()
    seen = json.loads(host.ssh("python3", "-", name, input=script).stdout)
    devices = parse_info_usb(seen["info_usb"])
    for device in devices:
        device["host"] = seen["host_devices"].get(device["id"])
    return devices
