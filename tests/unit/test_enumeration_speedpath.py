"""enumerate_devices takes a short cut for speed: it asks udev for the usb_device entries only,
reads the kernel's attributes as files under each device's sys_path and finds the interfaces in
the device's directory. This checks the short cut still says exactly what the plain pyudev walk
says (every usb entry from udev, every attribute and driver through libudev, interfaces grouped
by name), on the reference host, on the 200-device benchmark tree (as usbtree writes attributes
and as the kernel does, with a trailing newline), and on a tree of the corners the short cut must
get right: more than ten interfaces (udev orders 1.10 before 1.2), unbound interfaces, a DRIVER=
in the uevent without a driver link (libudev goes by the link), a device without interfaces,
strings or hwdb names, UTF-8 strings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from tests.lib import bigtree, usbtree
from tests.lib.modrun import collection_root
from tests.lib.trees import REFERENCE, hub

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHILD = """
import json, sys
sys.path[0:0] = [%r, %r]
from ansible_collections.kvmhost.usb.plugins.module_utils import _usb
from tests.lib.udev_walk import udev_walk
print(json.dumps({"fast": _usb.enumerate_devices(), "udev": udev_walk()}))
""" % (REPO, collection_root())


def both_ways(text):
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-speedpath-") as tmp:
        tree = os.path.join(tmp, "tree.umockdev")
        with open(tree, "w", encoding="utf-8") as handle:
            handle.write(text)
        process = subprocess.run(
            ["umockdev-run", "-d", tree, "--", sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, check=False
        )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout)
    return result["fast"], result["udev"]


def kernel_newlines(text):
    """Attribute values as sysfs has them: each ends with a newline."""
    return re.sub(r"(?m)^(A: .*)$", r"\1\\n", text)


def corners():
    composite = {
        "port": "1-1.2", "vendor_id": "046d", "product_id": "0892", "devnum": 4,
        "manufacturer": "Ünïcødé AG", "product": "Dock  \u00b5Cam", "serial": "ÀB 12",
        "speed": "480", "version": " 2.00", "device_class": "ef",
        "interfaces": [
            ("0e", "uvcvideo"), ("0e", "uvcvideo"), ("01", "snd-usb-audio"), ("01", "snd-usb-audio"),
            ("03", "usbhid"), ("ff", None), ("02", "cdc_ether"), ("0a", "cdc_ether"),
            ("08", "uas"), ("0b", None), ("e0", "btusb"), ("fe", None),
        ],
    }
    composite_no_class = dict(composite, port="1-1.3", devnum=5, device_class="00", serial="ÀB 12")
    bare = {"port": "1-1.4", "vendor_id": "abcd", "product_id": "0001", "devnum": 6, "device_class": "00", "interfaces": []}
    uevent_only = {
        "port": "1-1.1", "vendor_id": "0403", "product_id": "6001", "devnum": 3, "serial": "A1",
        "device_class": "00", "interfaces": [("ff", "ftdi_sio"), ("ff", "usbserial_generic")],
    }
    devices = [usbtree.root_hub(1), hub("1-1", 2), uevent_only, composite, composite_no_class, bare]
    text = usbtree.render(devices)
    # The second interface of 1-1.1 keeps its E: DRIVER but loses its driver link: libudev reports
    # no driver for it then, and enumerate_devices must not report one either.
    text = re.sub(r"(P: [^\n]*/1-1\.1:1\.1\n(?:[^\n]+\n)*?)L: driver=[^\n]*\n", r"\1", text)
    assert "usbserial_generic" in text and text.count("drivers/usbserial_generic") == 0
    return text, len(devices)


@pytest.mark.parametrize(
    "text, count",
    [
        pytest.param(usbtree.render(REFERENCE), len(REFERENCE), id="reference"),
        pytest.param(usbtree.render(bigtree.fleet_host(200)), 200, id="benchmark-tree"),
        pytest.param(kernel_newlines(usbtree.render(bigtree.fleet_host(200))), 200, id="benchmark-tree-kernel-newlines"),
        pytest.param(corners()[0], corners()[1], id="corners"),
        pytest.param(kernel_newlines(corners()[0]), corners()[1], id="corners-kernel-newlines"),
    ],
)
def test_short_cut_says_what_the_pyudev_walk_says(text, count):
    fast, udev = both_ways(text)
    assert len(udev) == count
    assert fast == udev


def test_corners_are_there():
    """The corner tree really has what the comparison relies on (else it proves nothing)."""
    fast, _udev = both_ways(corners()[0])
    by_port = dict((device["port"], device) for device in fast)
    # udev's order is the paths' strcmp order: interface 1.10 (e0) and 1.11 (fe) before 1.2 (01).
    assert by_port["1-1.2"]["driver"] == "uvcvideo,btusb,snd-usb-audio,usbhid,cdc_ether,uas"
    assert by_port["1-1.3"]["class"][:4] == ["Video", "Wireless", "Application Specific Interface", "Audio"]
    assert by_port["1-1.1"]["driver"] == "ftdi_sio"
    assert by_port["1-1.4"]["class"] == [] and by_port["1-1.4"]["driver"] is None and by_port["1-1.4"]["model"] is None
    assert by_port["1-1.2"]["manufacturer"] == "Ünïcødé AG"
