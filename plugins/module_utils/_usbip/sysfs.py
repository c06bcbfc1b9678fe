# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The kernel's side of USB/IP, through sysfs: a device read as usbip_usb_device describes it, bound to and unbound
from ``usbip-host`` on the exporting host (as ``usbip bind``/``unbind``), and the ports of ``vhci-hcd`` on the
importing one (loaded, read, attached and detached as ``usbip attach``/``detach`` do)."""

from __future__ import annotations

import os
import subprocess
import time

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import wire

SYS_USB = "/sys/bus/usb"
USBIP_HOST = SYS_USB + "/drivers/usbip-host"
VHCI = "/sys/devices/platform/vhci_hcd.0"

# usbip-host's usbip_status of a bound device (stub.h), vhci's port status (vhci.h).
SDEV_ST_AVAILABLE = 1
SDEV_ST_USED = 2
VDEV_ST_NULL = 4
VDEV_ST_USED = 6

# The sysfs ``speed`` attribute (Mbit/s) as enum usb_device_speed.
SPEEDS = {"1.5": wire.USB_SPEED_LOW, "12": wire.USB_SPEED_FULL, "480": wire.USB_SPEED_HIGH, "53.3-480": wire.USB_SPEED_WIRELESS, "5000": wire.USB_SPEED_SUPER}


def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def write(path, text):
    """Write one sysfs attribute; the kernel's refusal as a UsbipError naming the file."""
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as error:
        raise UsbipError("Cannot write %r to %s: %s" % (text, path, error.strerror or error))


def listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def _hex(value, default=0):
    try:
        return int(value, 16)
    except (TypeError, ValueError):
        return default


def _int(value, default=0):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# The exporting host


def sysfs_device(busid, root=SYS_USB):
    """A USB device of this host as usbip_usb_device describes it, read from sysfs; None when absent."""
    base = os.path.join(root, "devices", busid)
    if read(os.path.join(base, "idVendor")) is None:
        return None
    configuration = _int(read(os.path.join(base, "bConfigurationValue")), 0)
    interfaces = []
    for number in range(_int(read(os.path.join(base, "bNumInterfaces")), 0)):
        interface = os.path.join(base, "%s:%d.%d" % (busid, configuration, number))
        interfaces.append(tuple(_hex(read(os.path.join(interface, name))) for name in ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol")))
    busnum = _int(read(os.path.join(base, "busnum")))
    devnum = _int(read(os.path.join(base, "devnum")))
    return {
        "path": os.path.realpath(base),
        "busid": busid,
        "busnum": busnum,
        "devnum": devnum,
        "speed": SPEEDS.get(read(os.path.join(base, "speed")) or "", wire.USB_SPEED_SUPER_PLUS),
        "vendor_id": read(os.path.join(base, "idVendor")),
        "product_id": read(os.path.join(base, "idProduct")),
        "serial": read(os.path.join(base, "serial")),
        "bcd_device": _hex(read(os.path.join(base, "bcdDevice"))),
        "device_class": _hex(read(os.path.join(base, "bDeviceClass"))),
        "device_subclass": _hex(read(os.path.join(base, "bDeviceSubClass"))),
        "device_protocol": _hex(read(os.path.join(base, "bDeviceProtocol"))),
        "configuration_value": configuration,
        "num_configurations": _int(read(os.path.join(base, "bNumConfigurations")), 1),
        "interfaces": interfaces,
        "devid": wire.devid(busnum, devnum),
    }


def local_devices(root=SYS_USB):
    """The USB devices of this host, hubs and the devices it imported itself left out."""
    found = []
    for busid in listdir(os.path.join(root, "devices")):
        if ":" in busid or busid.startswith("usb"):
            continue
        device = sysfs_device(busid, root)
        if device is not None and "/vhci_hcd." not in device["path"]:
            found.append(device)
    return found


def driver_of(busid, root=SYS_USB):
    try:
        return os.path.basename(os.readlink(os.path.join(root, "devices", busid, "driver")))
    except OSError:
        return None


def bind(busid, root=SYS_USB):
    """Bind a device to usbip-host (as ``usbip bind``); True when it was not bound to it before."""
    if driver_of(busid, root) == "usbip-host":
        return False
    if not os.path.isdir(os.path.join(root, "drivers", "usbip-host")):
        raise UsbipError("The kernel module usbip-host is not loaded (modprobe usbip-host)")
    current = driver_of(busid, root)
    if current:
        write(os.path.join(root, "drivers", current, "unbind"), busid)
    write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "add %s" % busid)
    try:
        write(os.path.join(root, "drivers", "usbip-host", "bind"), busid)
    except UsbipError:
        write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "del %s" % busid)
        write(os.path.join(root, "drivers_probe"), busid)
        raise
    return True


def unbind(busid, root=SYS_USB):
    """Take a device from usbip-host and give it back to its own driver (as ``usbip unbind``); True when it was bound."""
    bound = driver_of(busid, root) == "usbip-host"
    if bound:
        write(os.path.join(root, "drivers", "usbip-host", "unbind"), busid)
    if os.path.isdir(os.path.join(root, "drivers", "usbip-host")):
        try:
            write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "del %s" % busid)
        except UsbipError:
            pass  # not in the table
    if bound and os.path.isdir(os.path.join(root, "devices", busid)):
        write(os.path.join(root, "drivers_probe"), busid)
    return bound


def stub_status(busid, root=SYS_USB):
    return _int(read(os.path.join(root, "devices", busid, "usbip_status")), 0)


def hand_over(busid, sock, root=SYS_USB):
    """Give the kernel the connection of an accepted import (as usbipd does)."""
    write(os.path.join(root, "devices", busid, "usbip_sockfd"), "%d\n" % sock.fileno())


# The importing host


def _vhci_names(root=VHCI):
    return sorted(name for name in listdir(os.path.dirname(root)) if name.startswith("vhci_hcd."))


def load_vhci(root=VHCI, timeout=10.0):
    """Load vhci-hcd unless its controllers are there: a host's first import, by a module, may come before the agent
    (whose unit loads it) is installed. True when it was loaded now."""
    if _vhci_names(root):
        return False
    if root != VHCI:
        raise UsbipError("The kernel module vhci-hcd is not loaded (no vhci_hcd.* beside %s)" % root)
    try:
        result = subprocess.run(["modprobe", "vhci-hcd"], capture_output=True, text=True, check=False)
    except OSError as error:
        raise UsbipError("Cannot run modprobe to load the kernel module vhci-hcd: %s" % error)
    if result.returncode != 0:
        raise UsbipError(
            "Cannot load the kernel module vhci-hcd (%s); it ships with the kernel: linux-image-amd64 on Debian,"
            " kernel-modules-extra on RHEL-family hosts" % (result.stderr.strip() or "modprobe exited %d" % result.returncode)
        )
    deadline = time.monotonic() + timeout
    while not _vhci_names(root):
        if time.monotonic() > deadline:
            raise UsbipError("vhci-hcd was loaded but no vhci_hcd controller appeared under %s" % os.path.dirname(root))
        time.sleep(0.1)
    return True


def vhci_ports(root=VHCI):
    """Every port of the vhci controllers: hub (hs or ss), port, status, speed, devid, local_busid."""
    names = _vhci_names(root)
    if not names:
        raise UsbipError("The kernel module vhci-hcd is not loaded (modprobe vhci-hcd)")
    ports = []
    for name in names:
        directory = os.path.join(os.path.dirname(root), name)
        for status in sorted(entry for entry in listdir(directory) if entry == "status" or entry.startswith("status.")):
            ports.extend(parse_vhci_status(read(os.path.join(directory, status)) or ""))
    return sorted(ports, key=lambda item: item["port"])


def vhci_port(vhci_port_number, root=VHCI):
    """The vhci port of that number, None when there is none."""
    return dict((item["port"], item) for item in vhci_ports(root)).get(vhci_port_number)


def parse_vhci_status(text):
    """The lines of a vhci status file: ``hub port sta spd dev sockfd local_busid``."""
    ports = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or fields[0] not in ("hs", "ss"):
            continue
        ports.append(
            {
                "hub": fields[0],
                "port": int(fields[1]),
                "status": int(fields[2]),
                "speed": int(fields[3]),
                "devid": int(fields[4], 16),
                "local_busid": None if fields[6] == "0-0" else fields[6],
            }
        )
    return ports


def free_port(ports, speed):
    """The first free vhci port of the hub for this speed: SuperSpeed devices need an ss port, others an hs one."""
    hub = "ss" if speed == wire.USB_SPEED_SUPER else "hs"
    for item in ports:
        if item["hub"] == hub and item["status"] == VDEV_ST_NULL:
            return item["port"]
    raise UsbipError("No free %s port on vhci-hcd (all %d in use)" % (hub, len([item for item in ports if item["hub"] == hub])))


def attach(vhci_port_number, sock, device, root=VHCI):
    """Hand the connection of an import to vhci-hcd at that port (as ``usbip attach``)."""
    write(os.path.join(root, "attach"), "%d %d %d %d" % (vhci_port_number, sock.fileno(), device["devid"], device["speed"]))


def detach(vhci_port_number, root=VHCI):
    """Detach a vhci port unless it is free (the kernel closes the connection)."""
    item = vhci_port(vhci_port_number, root)
    if item is not None and item["status"] != VDEV_ST_NULL:
        write(os.path.join(root, "detach"), "%d" % vhci_port_number)
