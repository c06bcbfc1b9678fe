"""Diskless libvirt guests inside the test host, and what they see on their USB bus.

A guest is ``<domain type='qemu'>`` (TCG), q35, a few MiB of RAM, a qemu-xhci controller,
no disk and no network: the firmware finds nothing to boot and idles, which is all a
USB passthrough test needs. It starts in seconds even under nested TCG.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
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


def dumpxml(host: TestHost, name: str, inactive: bool = False) -> str:
    """The guest's live (or persistent) domain XML."""
    return virsh(host, "dumpxml", name, *(["--inactive"] if inactive else [])).stdout


def hostdev_sources(host: TestHost, name: str, inactive: bool = False) -> list[str]:
    """The <source> of each USB hostdev in the guest's live (or persistent) XML, whitespace removed: what names the host device."""
    xml = dumpxml(host, name, inactive)
    sources = re.findall(r"<hostdev mode='subsystem' type='usb'.*?(<source.*?</source>)", xml, re.S)
    return [re.sub(r">\s+<", "><", source) for source in sources]


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
    return _devices(json.loads(host.ssh("python3", "-", name, input=_script()).stdout))


def _script() -> str:
    with open(GUEST_USB_SCRIPT) as handle:
        return handle.read()


def _devices(seen: dict[str, Any]) -> list[dict[str, Any]]:
    devices = parse_info_usb(seen["info_usb"])
    for device in devices:
        device["host"] = seen["host_devices"].get(device["id"])
    return devices


def host_path(device: dict[str, Any]) -> str | None:
    """The test host's ``/dev/bus/usb/BBB/DDD`` a guest's passed-through device is bound to (None for an emulated one)."""
    host = device.get("host")
    if not host:
        return None
    if host.get("hostdevice"):
        return host["hostdevice"]
    return "/dev/bus/usb/%03d/%03d" % (int(host["hostbus"]), int(host["hostaddr"]))


class UsbSampler:
    """Watch running guests' USB buses while something else happens: one process on the test host asks each
    guest's QEMU monitor in turn, round after round, as ``usb`` does; a thread here collects the answers.

        with UsbSampler(host, ["g1", "g2"]) as sampler:
            ...                                   # converge, replug
        sampler.samples                           # [(guest, [devices as usb() gives them]), ...] in the order asked

    Each answer is taken between two libvirt jobs on that guest. The guests are asked one after
    the other, never at the same instant: see the swap test for what two adjacent samples prove.
    """

    def __init__(self, host: TestHost, names: list[str], period: float = 0.2) -> None:
        self.host = host
        self.names = names
        self.period = period
        self.samples: list[tuple[str, list[dict[str, Any]]]] = []
        self.errors: list[str] = []
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._changed = threading.Condition()
        self._ended = False

    def __enter__(self) -> UsbSampler:
        # The script goes on the command line: its standard input stays open until __exit__ closes it.
        command = self.host.ssh_command(["python3", "-c", _script(), "--every", str(self.period)] + self.names)
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()
        try:
            # Every guest answered once: what comes next is sampled from its start.
            self.wait_for(len(self.names))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait(timeout=30)
        self._thread.join(timeout=30)

    def _collect(self) -> None:
        for line in self._process.stdout:
            with self._changed:
                self.samples.append(self._sample(line))
                self._changed.notify_all()
        with self._changed:
            self.errors.append(self._process.stderr.read())
            self._ended = True
            self._changed.notify_all()

    @staticmethod
    def _sample(line: str) -> tuple[str, list[dict[str, Any]]]:
        seen = json.loads(line)
        return seen["domain"], _devices(seen)

    def wait_for(self, count: int, timeout: float = 300.0) -> None:
        """Wait until ``count`` more samples than now have been collected (each guest once: ``len(names)``)."""
        with self._changed:
            target = len(self.samples) + count
            if not self._changed.wait_for(lambda: len(self.samples) >= target or self._ended, timeout):
                raise TimeoutError("no %d USB samples of %s within %.0f s" % (count, ", ".join(self.names), timeout))
            if len(self.samples) < target:
                raise RuntimeError("the USB sampler on the test host ended: %s" % "".join(self.errors).strip())


def kernel_address(host: TestHost, serial: str) -> tuple[int, int] | None:
    device = host.kernel_device(serial=serial)
    return (int(device["busnum"]), int(device["devnum"])) if device else None


def bound_in_guest(host: TestHost, guest: str, serial: str) -> list[dict[str, Any]]:
    """The guest's USB devices passed through from the host device with this serial as it is now."""
    address = kernel_address(host, serial)
    if address is None:
        return []
    path = "/dev/bus/usb/%03d/%03d" % address
    return [device for device in host.guest_usb(guest) if device["host"] and device["host"]["attached"] and device["host"]["hostdevice"] == path]


def wait_settled(host: TestHost, guest: str, serial: str, timeout: float = 120.0) -> tuple[int, int]:
    """After a storm: wait until the device keeps one kernel address for a few seconds and the guest
    holds it there; that address. (The kernel may still be enumerating the storm's last plug when
    the guest already holds an earlier one.)"""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        address = kernel_address(host, serial)
        if address is not None and address == previous and bound_in_guest(host, guest, serial):
            return address
        if time.monotonic() > deadline:
            raise AssertionError("%s did not settle in %s: kernel %s, guest %s" % (serial, guest, address, host.guest_usb(guest)))
        previous = address
        time.sleep(3)


def wait_in_guest(host: TestHost, guest: str, serial: str, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the guest holds the host device with this serial at its current address."""
    deadline = time.monotonic() + timeout
    while True:
        bound = bound_in_guest(host, guest, serial)
        if bound:
            return bound[0]
        if time.monotonic() > deadline:
            raise AssertionError("%s never came back in %s: %s" % (serial, guest, host.guest_usb(guest)))
        time.sleep(1)
