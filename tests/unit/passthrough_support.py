"""What the usb_attach and usb_detach tests share: diskless domains on the run's own libvirtd,
their XML, and the modules run under umockdev with a described USB tree."""

from __future__ import annotations

import os
import re
import time

import libvirt
import pytest

from tests.lib.domains import DOMAIN_XML, URI, undefine
from tests.lib.modrun import collection_root, run_module
from tests.unit.trees import KINGSTON, REFERENCE, hid

PREFIX = "kvmhost-usb-test-"
NAMESPACE = "http://kvmhost.usb/ns/passthrough/1"

KINGSTON_ID = "0951:1666:E0D55EA5741AF160B9740A81"
# Two identical tablets (same vendor:product), told apart by serial and by port.
TWINS = tuple(REFERENCE) + (hid("1-2", 3, serial="43"),)


def quiet(ctx, error):
    return None


libvirt.registerErrorHandler(quiet, None)


class Domains:
    """Diskless domains named kvmhost-usb-test-*, defined on demand and removed at the end."""

    def __init__(self):
        self.conn = libvirt.open(URI)
        self.names = []

    def define(self, suffix, devices=()):
        name = PREFIX + suffix
        undefine(self.conn, name)
        self.conn.defineXML(DOMAIN_XML.format(name=name, devices="\n    ".join(devices)))
        self.names.append(name)
        return name

    def remove(self, name):
        undefine(self.conn, name)
        self.names.remove(name)

    def lookup(self, name):
        return self.conn.lookupByName(name)

    def inactive(self, name):
        return self.lookup(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)

    def live(self, name):
        return self.lookup(name).XMLDesc(0)

    def snapshot(self):
        """Every test domain's persistent and live XML, to show that a failed run changed nothing."""
        state = {}
        for name in self.names:
            domain = self.lookup(name)
            state[name] = (self.inactive(name), self.live(name) if domain.isActive() else None)
        return state

    def set_intent(self, name, xml, live=False):
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if live else libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.lookup(name).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, "kvmhost-usb", NAMESPACE, flags)

    def close(self):
        for name in self.names:
            undefine(self.conn, name)
        self.conn.close()


@pytest.fixture
def domains():
    created = Domains()
    yield created
    created.close()


def hostdevs(xml):
    """The USB hostdev elements of a domain XML, exactly as libvirt prints them."""
    return re.findall(r"^    <hostdev mode='subsystem' type='usb'.*?^    </hostdev>\n", xml, re.S | re.M)


def metadata(xml):
    """The collection's metadata element of a domain XML, exactly as libvirt prints it, or None."""
    found = re.search(r"^    <kvmhost-usb:passthrough .*?^    </kvmhost-usb:passthrough>\n", xml, re.S | re.M)
    return found.group(0) if found else None


def hostdev(vendor, product, bus=None, device=None, port=1, policy="optional"):
    """A persistent USB hostdev as libvirt prints it in a domain XML."""
    source = "      <source startupPolicy='%s'>\n" % policy if policy else "      <source>\n"
    address = "        <address bus='%d' device='%d'/>\n" % (bus, device) if bus is not None else ""
    return (
        "    <hostdev mode='subsystem' type='usb' managed='no'>\n"
        + source
        + "        <vendor id='0x%s'/>\n" % vendor
        + "        <product id='0x%s'/>\n" % product
        + address
        + "      </source>\n"
        + "      <address type='usb' bus='0' port='%d'/>\n" % port
        + "    </hostdev>\n"
    )


# What an intent entry records of the devices of REFERENCE and TWINS beside the id: serial, port, address.
BOUND = {
    KINGSTON_ID: {"serial": "E0D55EA5741AF160B9740A81", "port": "2-1", "address": "002:002"},
    "0627:0001:42": {"serial": "42", "port": "1-1", "address": "001:002"},
    "0627:0001:43": {"serial": "43", "port": "1-2", "address": "001:003"},
}


def intent(*entries):
    """The metadata element for ``(id, {selector})`` entries as libvirt prints it; an entry records the serial, port and
    address of BOUND, or those of a third item ``{serial, port, address}`` (empty for an entry written by 0.1.0)."""
    text = '    <kvmhost-usb:passthrough xmlns:kvmhost-usb="%s">\n' % NAMESPACE
    for device_id, selector, *bound in entries:
        attributes = "".join(' %s="%s"' % (key, value) for key, value in selector.items())
        recorded = bound[0] if bound else BOUND.get(device_id, {})
        fields = "".join(' %s="%s"' % (key, recorded[key]) for key in ("serial", "port", "address") if recorded.get(key))
        text += '      <kvmhost-usb:device id="%s"%s>\n' % (device_id, fields)
        text += "        <kvmhost-usb:selector%s/>\n" % attributes
        text += "      </kvmhost-usb:device>\n"
    return text + "    </kvmhost-usb:passthrough>\n"


def source_xml(vendor=None, product=None, bus=None, device=None):
    """A hand-written hostdev, as an operator would put it in a domain with virsh."""
    parts = ""
    if vendor:
        parts += "<vendor id='0x%s'/><product id='0x%s'/>" % (vendor, product)
    if bus is not None:
        parts += "<address bus='%d' device='%d'/>" % (bus, device)
    return "<hostdev mode='subsystem' type='usb' managed='no'><source>%s</source></hostdev>" % parts


def attach(args, devices=tuple(REFERENCE), **options):
    return run_module("usb_attach", args, devices, **options)


def detach(args, devices=tuple(REFERENCE), **options):
    return run_module("usb_detach", args, devices, **options)


def without_library(tmp_path, name):
    """An environment in which ``import name`` fails on the target, as on a host without the package."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / ("%s.py" % name)).write_text("raise ImportError(%r)\n" % ("No module named '%s'" % name))
    return {"PYTHONPATH": os.pathsep.join([str(shim), collection_root()])}


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


def failed(result, *fragments):
    assert result["rc"] != 0 and result.get("failed") is True, result
    for fragment in fragments:
        assert fragment in result["msg"], result["msg"]
    return result["msg"]


def lock_waiters(path):
    """How many flock requests on the file at ``path`` are blocked, from /proc/locks ("->" marks a waiter)."""
    inode = ":%d " % os.stat(path).st_ino
    with open("/proc/locks") as handle:
        return len([line for line in handle if "->" in line and inode in line])


def wait_for_lock_waiter(path, run, results, timeout=60.0):
    """Wait until the module run in the thread ``run`` waits for the host lock at ``path`` (held by the test)."""
    deadline = time.monotonic() + timeout
    while not lock_waiters(path):
        assert time.monotonic() < deadline and run.is_alive(), "the run did not wait for the host lock: %s" % results
        time.sleep(0.1)
