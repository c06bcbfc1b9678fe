"""Domain XML as libvirt prints what the modules write: USB hostdevs and the collection's intent metadata; and
hostdevs as an operator writes them by hand."""

from __future__ import annotations

import re

from .trees import KINGSTON_ID

NAMESPACE = "http://kvmhost.usb/ns/passthrough/1"

# What an intent entry records of the devices of REFERENCE and TWINS beside the id: serial, port, address.
BOUND = {
    KINGSTON_ID: {"serial": "E0D55EA5741AF160B9740A81", "port": "2-1", "address": "002:002"},
    "0627:0001:42": {"serial": "42", "port": "1-1", "address": "001:002"},
    "0627:0001:43": {"serial": "43", "port": "1-2", "address": "001:003"},
}


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
