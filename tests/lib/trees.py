"""USB device trees the unit tests describe (see tests/lib/usbtree.py for the fields)."""

from __future__ import annotations

from tests.lib.usbtree import root_hub

KINGSTON = {
    "port": "2-1",
    "vendor_id": "0951",
    "product_id": "1666",
    "devnum": 2,
    "manufacturer": "Kingston",
    "product": "DataTraveler 3.0",
    "serial": "E0D55EA5741AF160B9740A81",
    "vendor_db": "Kingston Technology",
    "model_db": "DataTraveler 100 G3/G4/SE9 G2/50",
    "speed": "5000",
    "version": " 3.20",
    "device_class": "00",
    "interfaces": [("08", "usb-storage")],
}

TABLET = {
    "port": "1-1",
    "vendor_id": "0627",
    "product_id": "0001",
    "devnum": 2,
    "manufacturer": "QEMU",
    "product": "QEMU USB Tablet",
    "serial": "42",
    "vendor_db": "Adomax Technology Co., Ltd",
    "speed": "480",
    "version": " 2.00",
    "device_class": "00",
    "interfaces": [("03", "usbhid")],
}

# The example of the reference's documentation: lsusb showed exactly these four.
REFERENCE = [root_hub(1), TABLET, root_hub(2, usb3=True), KINGSTON]
KINGSTON_ID = "0951:1666:E0D55EA5741AF160B9740A81"


def hid(port, devnum, serial=None, **extra):
    device = dict(TABLET, port=port, devnum=devnum, serial=serial)
    device.update(extra)
    return device


def hub(port, devnum):
    return {
        "port": port,
        "vendor_id": "0409",
        "product_id": "55aa",
        "devnum": devnum,
        "manufacturer": "QEMU",
        "product": "QEMU USB Hub",
        "vendor_db": "NEC Corp.",
        "model_db": "Hub",
        "speed": "12",
        "version": " 1.10",
        "device_class": "09",
        "interfaces": [("09", "hub")],
    }


# Two identical tablets (same vendor:product), told apart by serial and by port.
TWINS = tuple(REFERENCE) + (hid("1-2", 3, serial="43"),)
# The twins after the tablet with serial 42 was replugged: device 2 became device 7.
REPLUGGED = REFERENCE[:1] + [hid("1-1", 7, serial="42")] + REFERENCE[2:] + [hid("1-2", 3, serial="43")]


def root_devno():
    """major:minor of the host's root filesystem, from the real mount table."""
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if fields[4] == "/":
                return fields[2]
    raise AssertionError("no root mount in /proc/self/mountinfo")


def mounted_stick(**extra):
    """The Kingston stick with a partition that is the host's root filesystem (same major:minor)."""
    stick = dict(KINGSTON, block=[("sdz", "8:240"), ("sdz1", root_devno())])
    stick.update(extra)
    return stick
