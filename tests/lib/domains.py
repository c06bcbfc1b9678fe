"""Diskless TCG domains on the test run's own libvirtd, removed again afterwards."""

from __future__ import annotations

import contextlib
import os

import libvirt

from .domain_xml import NAMESPACE

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
PREFIX = "kvmhost-usb-test-"


def quiet(ctx, error):
    return None


# The tests look up domains that may not exist: libvirt would print each miss on stderr.
libvirt.registerErrorHandler(quiet, None)


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


class Domains:
    """Diskless domains named kvmhost-usb-test-*, defined on demand and removed at the end (the unit tier's
    ``domains`` fixture)."""

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
