"""Diskless TCG domains on the test run's own libvirtd, removed again afterwards."""

from __future__ import annotations

import contextlib
import os

import libvirt

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The libvirtd of this checkout's test runs (tests/lib/libvirtd.py starts it), never the machine's own.
LIBVIRT_DIR = os.path.join(REPO, "build", "libvirt")
URI = "qemu+unix:///system?socket=%s" % os.path.join(LIBVIRT_DIR, "run", "libvirt-sock")

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <memballoon model='none'/>
    {devices}
  </devices>
</domain>"""


def usb_hostdev_xml(vendor_id=None, product_id=None, bus=None, device=None):
    parts = []
    if vendor_id:
        parts.append("<vendor id='0x%s'/><product id='0x%s'/>" % (vendor_id, product_id))
    if bus is not None:
        parts.append("<address bus='%d' device='%d'/>" % (bus, device))
    return "<hostdev mode='subsystem' type='usb' managed='no'><source>%s</source></hostdev>" % "".join(parts)


def undefine(conn, name):
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    persistent = domain.isPersistent()  # a transient domain is gone once destroyed
    if domain.isActive():
        domain.destroy()
    if persistent:
        domain.undefine()


@contextlib.contextmanager
def defined_domains(specs):
    """Define domains from ``{name: [device xml, ...]}``; yield the connection; undefine them."""
    conn = libvirt.open(URI)
    try:
        for name, devices in specs.items():
            undefine(conn, name)
            conn.defineXML(DOMAIN_XML.format(name=name, devices="\n    ".join(devices)))
        yield conn
    finally:
        for name in specs:
            undefine(conn, name)
        conn.close()
