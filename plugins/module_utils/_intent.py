# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The passthrough intent recorded in a domain's ``<metadata>``: which devices the domain should have.

In the domain XML it reads::

    <metadata>
      <kvmhost-usb:passthrough xmlns:kvmhost-usb="http://kvmhost.usb/ns/passthrough/1">
        <kvmhost-usb:device id="0951:1666:E0D55EA5741AF160B9740A81" serial="E0D55EA5741AF160B9740A81" port="2-1" address="002:002">
          <kvmhost-usb:selector vendor_id="0951" product_id="1666"/>
        </kvmhost-usb:device>
      </kvmhost-usb:passthrough>
    </metadata>

Each entry is the resolved device id and the normalised selector the operator gave, and the device's serial,
port and the bus/device address it was bound at: what finds the device again after the id rule changed its id
(see ``_host``). Entries written before these were recorded lack them and are completed on the next run.

A device imported from another KVM host (a selector with ``host``) also records ``host`` and the
``link_address`` it was imported from, so that the reattach agent can import it again::

    <kvmhost-usb:device id="46f4:0001:KING0001" serial="KING0001" port="3-1" address="003:002" host="kvm1" link_address="10.77.0.1">
      <kvmhost-usb:selector id="46f4:0001:KING0001" host="kvm1"/>
    </kvmhost-usb:device>
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import RECORDED_FIELDS

NAMESPACE = "http://kvmhost.usb/ns/passthrough/1"
PREFIX = "kvmhost-usb"
ROOT = "passthrough"
# What the device had when it was bound, beside its id, and where it was imported from.
BOUND_FIELDS = ("serial", "port", "address", "host", "link_address", "link_port")

ET.register_namespace(PREFIX, NAMESPACE)
# The intent element in a domain XML as libvirt formats it (setMetadata stores it with this prefix).
ELEMENT = re.compile(r"<{0}:{1}\b[^>]*?/>|<{0}:{1}\b.*?</{0}:{1}>".format(PREFIX, ROOT), re.DOTALL)


def from_domain_xml(xml_text: str) -> list[dict]:
    """The intent entries of a domain XML: a list of ``{"id": ..., "selector": {...}}``."""
    root = ET.fromstring(xml_text)
    element = root.find("./metadata/{%s}%s" % (NAMESPACE, ROOT))
    if element is None:
        return []
    entries = []
    for device in element.findall("{%s}device" % NAMESPACE):
        selector_element = device.find("{%s}selector" % NAMESPACE)
        attributes = selector_element.attrib if selector_element is not None else {}
        selector = dict((field, attributes[field]) for field in RECORDED_FIELDS if attributes.get(field))
        entry = {"id": device.get("id"), "selector": selector}
        entry.update((key, device.get(key)) for key in BOUND_FIELDS if device.get(key))
        entries.append(entry)
    return entries


def to_xml(entries: list[dict], namespace: str | None = None) -> str:
    """The metadata element for the entries, as ``setMetadata`` takes it (no namespace) or, with
    ``namespace``, qualified for display."""
    tag = "{%s}%%s" % namespace if namespace else "%s"
    root = ET.Element(tag % ROOT)
    for entry in entries:
        device = ET.SubElement(root, tag % "device", id=entry["id"])
        for key in BOUND_FIELDS:
            if entry.get(key):
                device.set(key, entry[key])
        ET.SubElement(device, tag % "selector", dict((field, entry["selector"][field]) for field in RECORDED_FIELDS if field in entry["selector"]))
    return ET.tostring(root, encoding="unicode")


def display(entries: list[dict]) -> str:
    """The entries as they read in the domain XML, one line per element, for diffs."""
    element = ET.fromstring(to_xml(entries, namespace=NAMESPACE))
    ET.indent(element)
    return ET.tostring(element, encoding="unicode")


def in_domain_xml(xml_text: str, entries: list[dict]) -> str:
    """The domain XML text with its intent element replaced by one for ``entries`` (none when empty), the rest
    as libvirt wrote it. ValueError when the result would not read back as ``entries``."""
    text = ELEMENT.sub("", xml_text)
    if entries:
        element = to_xml(entries, namespace=NAMESPACE)
        if "<metadata>" in text:
            text = text.replace("<metadata>", "<metadata>" + element, 1)
        elif "<metadata/>" in text:
            text = text.replace("<metadata/>", "<metadata>%s</metadata>" % element, 1)
        else:
            text = text.replace("</uuid>", "</uuid><metadata>%s</metadata>" % element, 1)
    if from_domain_xml(text) != from_domain_xml("<domain><metadata>%s</metadata></domain>" % to_xml(entries, namespace=NAMESPACE)):
        raise ValueError("the intent element of the domain XML could not be replaced")
    return text
