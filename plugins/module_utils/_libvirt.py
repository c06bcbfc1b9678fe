# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""libvirt access through libvirt-python: connections, domains and their USB hostdevs."""

from __future__ import annotations

import re
import traceback
import xml.etree.ElementTree as ET

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LibvirtError

LIBVIRT_IMPORT_ERROR = None
try:
    import libvirt
except ImportError:
    libvirt = None
    LIBVIRT_IMPORT_ERROR = traceback.format_exc()

UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")

LIBVIRT_REQUIREMENT = "libvirt-python (Debian/Ubuntu: python3-libvirt, RHEL family: python3-libvirt, or pip install libvirt-python)"


def _quiet(ctx, error):
    # libvirt prints every error to stderr by default; the modules report them instead.
    return None


def connect(uri):
    if libvirt is not None:
        libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise LibvirtError("Cannot connect to libvirt at %s: %s" % (uri, error.get_error_message() or error))


def domain_state_name(domain):
    state = domain.state()[0]
    names = {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown",
        libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
    }
    return names.get(state, "unknown")


def domain_xml(domain, inactive=False):
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    return domain.XMLDesc(flags)


def usb_hostdevs(xml_text):
    """The USB hostdevs of a domain XML, each as vendor_id, product_id, bus, device (None when absent)."""
    root = ET.fromstring(xml_text)
    hostdevs = [usb_hostdev(element) for element in root.findall("./devices/hostdev[@type='usb']")]
    return [hostdev for hostdev in hostdevs if hostdev is not None]


def usb_hostdev(element):
    """One ``<hostdev type='usb'>`` element as a hostdev dict; None when it has no source."""
    source = element.find("source")
    if element.tag != "hostdev" or element.get("type") != "usb" or source is None:
        return None
    vendor = source.find("vendor")
    product = source.find("product")
    address = source.find("address")
    return {
        "vendor_id": _hex4(vendor.get("id")) if vendor is not None else None,
        "product_id": _hex4(product.get("id")) if product is not None else None,
        "bus": _int(address.get("bus")) if address is not None else None,
        "device": _int(address.get("device")) if address is not None else None,
        "startup_policy": source.get("startupPolicy"),
        "alias": _alias(element),
    }


def _alias(element):
    alias = element.find("alias")
    return alias.get("name") if alias is not None else None


def _hex4(value):
    if value is None:
        return None
    return "%04x" % int(value, 16 if value.lower().startswith("0x") else 10)


def _int(value):
    if value is None:
        return None
    return int(value, 0) if value.lower().startswith("0x") else int(value)


def hostdev_matches(hostdev, device):
    """Whether a hostdev designates a device: by bus/device when it has an address, else by vendor/product."""
    if hostdev["bus"] is not None and hostdev["device"] is not None:
        if (hostdev["bus"], hostdev["device"]) != (device["bus"], device["device"]):
            return False
        return hostdev["vendor_id"] is None or hostdev["vendor_id"] == device["vendor_id"]
    return hostdev["vendor_id"] == device["vendor_id"] and hostdev["product_id"] == device["product_id"]


def hostdev_xml(hostdev):
    """The ``<hostdev>`` element for a hostdev dict (vendor_id, product_id, bus, device, startup_policy).

    The same text is written to libvirt and shown in diffs, so both say the same thing."""
    element = ET.Element("hostdev", mode="subsystem", type="usb")
    source = ET.SubElement(element, "source")
    if hostdev.get("startup_policy"):
        source.set("startupPolicy", hostdev["startup_policy"])
    if hostdev.get("vendor_id"):
        ET.SubElement(source, "vendor", id="0x" + hostdev["vendor_id"])
    if hostdev.get("product_id"):
        ET.SubElement(source, "product", id="0x" + hostdev["product_id"])
    if hostdev.get("bus") is not None and hostdev.get("device") is not None:
        ET.SubElement(source, "address", bus=str(hostdev["bus"]), device=str(hostdev["device"]))
    return ET.tostring(element, encoding="unicode")


def same_hostdev(first, second):
    """Whether two hostdev dicts name the same source, as libvirt matches a hostdev to detach: by address
    when it has one, by vendor and product when it has them."""
    if first.get("bus") is not None or second.get("bus") is not None:
        if (first.get("bus"), first.get("device")) != (second.get("bus"), second.get("device")):
            return False
    return (first.get("vendor_id"), first.get("product_id")) == (second.get("vendor_id"), second.get("product_id"))


def add_hostdev(devices, hostdev):
    """Append the ``<hostdev>`` of a hostdev dict to a <devices> element."""
    devices.append(ET.fromstring(hostdev_xml(hostdev)))


def remove_hostdev(devices, hostdev):
    """Remove from a <devices> element the first USB hostdev with the same source; whether there was one."""
    for element in devices.findall("hostdev"):
        found = usb_hostdev(element)
        if found is not None and same_hostdev(found, hostdev):
            devices.remove(element)
            return True
    return False


# libvirt formats a domain's <devices> at two spaces of indentation, once in a document.
DEVICES = re.compile(r"^  <devices>$.*?^  </devices>$", re.DOTALL | re.MULTILINE)


def persistent_xml(domain):
    """A domain's persistent definition with its secrets (graphics passwords): what a define writes back whole."""
    return domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)


def devices_element(xml_text):
    """The <devices> element of a domain XML as libvirt formats it, parsed; None when it is not there once."""
    found = DEVICES.findall(xml_text)
    return ET.fromstring(found[0]) if len(found) == 1 else None


def with_devices(xml_text, devices):
    """The domain XML text with its <devices> element replaced by ``devices``, the rest as libvirt wrote it:
    ElementTree would move the metadata's namespace declarations and rename other tools' default namespaces."""
    text = ET.tostring(devices, encoding="unicode").rstrip()
    return DEVICES.sub(lambda _match: "  " + text, xml_text, count=1)


def lookup_domain(conn, name_or_uuid):
    """The domain with this name, else with this UUID; None when there is none."""
    try:
        return conn.lookupByName(name_or_uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    if not UUID.match(name_or_uuid):
        return None
    try:
        return conn.lookupByUUIDString(name_or_uuid)
    except libvirt.libvirtError as error:
        if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    return None


def error_message(error):
    """libvirt's own message of a libvirtError (or the text of ours, a LibvirtError)."""
    if isinstance(error, LibvirtError):
        return str(error)
    return error.get_error_message() or str(error)


def find_domain(conn, name_or_uuid):
    """The domain with this name, else with this UUID; LibvirtError naming the host's domains when there is none."""
    domain = lookup_domain(conn, name_or_uuid)
    if domain is None:
        names = sorted(other.name() for other in conn.listAllDomains(0))
        raise LibvirtError("No domain named or with UUID %s; domains on this host: %s" % (name_or_uuid, ", ".join(names) or "none"))
    return domain
