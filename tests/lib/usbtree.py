"""Describe USB device trees for umockdev: the tests say which devices a host has.

A device is a dict: ``port`` (sysfs port path such as ``2-1.4``; ``usbN`` for a root hub),
``vendor_id``, ``product_id``, ``devnum`` and optional ``manufacturer``, ``product``,
``serial``, ``vendor_db``/``model_db`` (what udev's hwdb adds), ``speed``, ``version``,
``device_class`` (hex byte) and ``interfaces`` (list of ``(class hex, driver or None)``).

A storage device may have ``block``: a list of ``(name, "major:minor")``, the disk first and then its
partitions, each optionally with a third item, the names of the virtual block devices stacked on it
(device mapper, md), given as ``(name, "major:minor")`` too.
"""

from __future__ import annotations

import glob
import os
import shutil
import struct

PCI_PATH = "/devices/pci0000:00/0000:00:14.0"


def root_hub(bus, usb3=False):
    return {
        "port": "usb%d" % bus,
        "vendor_id": "1d6b",
        "product_id": "0003" if usb3 else "0002",
        "devnum": 1,
        "manufacturer": "Linux 6.1.0-28-amd64 xhci-hcd",
        "product": "xHCI Host Controller",
        "serial": "0000:00:14.0",
        "vendor_db": "Linux Foundation",
        "model_db": "3.0 root hub" if usb3 else "2.0 root hub",
        "speed": "5000" if usb3 else "480",
        "version": " 3.00" if usb3 else " 2.00",
        "device_class": "09",
        "interfaces": [("09", "hub")],
    }


def bus_of(port):
    return int(port[3:]) if port.startswith("usb") else int(port.split("-", 1)[0])


def sysfs_path(port):
    bus = bus_of(port)
    path = "%s/usb%d" % (PCI_PATH, bus)
    if port.startswith("usb"):
        return path
    head, rest = port.split("-", 1)
    steps = rest.split(".")
    for depth in range(1, len(steps) + 1):
        path += "/%s-%s" % (head, ".".join(steps[:depth]))
    return path


def descriptors(device):
    """Binary device + configuration + interface descriptors, as sysfs ``descriptors`` holds them."""
    interfaces = device.get("interfaces") or []
    strings = [device.get("manufacturer"), device.get("product"), device.get("serial")]
    index = [i + 1 if value else 0 for i, value in enumerate(strings)]
    bcd_usb = int(float((device.get("version") or "2.00").strip()) * 100)
    bcd_usb = int(str(bcd_usb), 16)
    data = struct.pack(
        "<BBHBBBBHHHBBBB",
        18, 1, bcd_usb, int(device.get("device_class", "00"), 16), 0, 0, 64,
        int(device["vendor_id"], 16), int(device["product_id"], 16), 0x0100,
        index[0], index[1], index[2], 1,
    )
    total = 9 + 9 * len(interfaces)
    data += struct.pack("<BBHBBBBB", 9, 2, total, len(interfaces), 1, 0, 0x80, 50)
    for number, interface in enumerate(interfaces):
        data += struct.pack("<BBBBBBBBB", 9, 4, number, 0, 0, int(interface[0], 16), 0, 0, 0)
    return data


def render(devices):
    """The umockdev-record text for a list of devices."""
    blocks = []
    for device in devices:
        if "vhci_ports" in device:
            blocks.append(_vhci_block(device["vhci_ports"]))
            continue
        port = device["port"]
        path = sysfs_path(port)
        bus = bus_of(port)
        lines = [
            "P: %s" % path,
            "N: bus/usb/%03d/%03d" % (bus, device["devnum"]),
            "E: DEVNAME=/dev/bus/usb/%03d/%03d" % (bus, device["devnum"]),
            "E: DEVTYPE=usb_device",
            "E: DRIVER=usb",
            "E: SUBSYSTEM=usb",
            "E: BUSNUM=%03d" % bus,
            "E: DEVNUM=%03d" % device["devnum"],
            "E: PRODUCT=%x/%x/100" % (int(device["vendor_id"], 16), int(device["product_id"], 16)),
        ]
        if device.get("vendor_db"):
            lines.append("E: ID_VENDOR_FROM_DATABASE=%s" % device["vendor_db"])
        if device.get("model_db"):
            lines.append("E: ID_MODEL_FROM_DATABASE=%s" % device["model_db"])
        attributes = {
            "idVendor": device["vendor_id"],
            "idProduct": device["product_id"],
            "busnum": str(bus),
            "devnum": str(device["devnum"]),
            "speed": device.get("speed", "480"),
            "version": device.get("version", " 2.00"),
            "bDeviceClass": device.get("device_class", "00"),
            "bNumInterfaces": "%2d" % len(device.get("interfaces") or []),
            "manufacturer": device.get("manufacturer"),
            "product": device.get("product"),
            "serial": device.get("serial"),
        }
        for name, value in attributes.items():
            if value is not None:
                lines.append("A: %s=%s" % (name, _escape(value)))
        lines.append("H: descriptors=%s" % descriptors(device).hex().upper())
        lines.append("L: driver=%s/bus/usb/drivers/usb" % ("/".join([".."] * path.count("/"))))
        blocks.append("\n".join(lines))
        interface_owner = "%d-0" % bus if port.startswith("usb") else port
        for number, (cls, driver) in enumerate(device.get("interfaces") or []):
            interface_path = "%s/%s:1.%d" % (path, interface_owner, number)
            lines = [
                "P: %s" % interface_path,
                "E: DEVTYPE=usb_interface",
                "E: SUBSYSTEM=usb",
                "A: bInterfaceClass=%s" % cls,
                "A: bInterfaceNumber=%02x" % number,
            ]
            if driver:
                lines.append("E: DRIVER=%s" % driver)
                lines.append("L: driver=%s/bus/usb/drivers/%s" % ("/".join([".."] * interface_path.count("/")), driver))
            blocks.append("\n".join(lines))
        blocks.extend(_block_devices(path, port, device.get("block") or []))
    return "\n\n".join(blocks) + "\n"


def _block_device(path, name, devno, devtype, holders=()):
    major, minor = devno.split(":")
    lines = [
        "P: %s" % path,
        "N: %s" % name,
        "E: DEVNAME=/dev/%s" % name,
        "E: DEVTYPE=%s" % devtype,
        "E: SUBSYSTEM=block",
        "E: MAJOR=%s" % major,
        "E: MINOR=%s" % minor,
        "A: dev=%s" % devno,
    ]
    for holder, _devno in holders:
        lines.append("L: holders/%s=%s/virtual/block/%s" % (holder, "/".join([".."] * path.count("/")), holder))
    return "\n".join(lines)


def _block_devices(path, port, block):
    """A disk below the device's first interface (as usb-storage puts it), its partitions, what is stacked on them."""
    if not block:
        return []
    disk_path = "%s/%s:1.0/host0/target0:0:0/0:0:0:0/block/%s" % (path, port, block[0][0])
    blocks = []
    for index, entry in enumerate(block):
        name, devno = entry[0], entry[1]
        holders = entry[2] if len(entry) > 2 else ()
        own_path = disk_path if index == 0 else "%s/%s" % (disk_path, name)
        blocks.append(_block_device(own_path, name, devno, "disk" if index == 0 else "partition", holders))
        for holder, holder_devno in holders:
            blocks.append(_block_device("/devices/virtual/block/%s" % holder, holder, holder_devno, "disk"))
    return blocks


def vhci_hcd(ports):
    """The vhci-hcd platform device of a host that imports over USB/IP, as the kernel shows it: ``ports`` maps a vhci
    port number to the port path of the device imported there (the others are free), like ``usbip port`` lists them.
    Its ``attach`` and ``detach`` files are plain files here, so a test reads back what was written to them."""
    return {"vhci_ports": ports}


def _vhci_block(ports):
    lines = ["hub port sta spd dev      sockfd local_busid"]
    for number in range(8):
        local = ports.get(number)
        if local:
            lines.append("hs  %04d 006 003 %08x 000003 %s" % (number, (int(local.split("-")[0]) << 16) | 2, local))
        else:
            lines.append("hs  %04d 004 000 00000000 000000 0-0" % number)
    return "\n".join(
        [
            "P: /devices/platform/vhci_hcd.0",
            "E: DRIVER=vhci_hcd",
            "E: SUBSYSTEM=platform",
            "A: status=%s" % _escape("\n".join(lines) + "\n"),
            "A: nports=8",
            "A: attach=",
            "A: detach=",
        ]
    )


def _escape(value):
    # umockdev reads attribute values up to the end of the line, with C escapes.
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def unplug(testbed, device):
    """Pull a device of a described tree out of a running umockdev testbed (the directory umockdev-run gives its
    command in UMOCKDEV_DIR), as the kernel does: its sysfs directory with its interfaces, its links under
    /sys/bus/usb/devices and its /dev node are gone. What umockdev_testbed_remove_device() removes."""
    port = device["port"]
    shutil.rmtree(testbed + "/sys" + sysfs_path(port))
    for link in [testbed + "/sys/bus/usb/devices/" + port] + glob.glob(testbed + "/sys/bus/usb/devices/" + port + ":*"):
        os.unlink(link)
    os.unlink("%s/dev/bus/usb/%03d/%03d" % (testbed, bus_of(port), device["devnum"]))
