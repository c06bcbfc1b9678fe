# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The declaration: what an operator writes, and its one check. Everything that reads a declaration (the modules, the
usb_exports filter and the action plugins on the controller, the planner) takes its shape from here.

A host's ``usb_passthrough`` maps domain names to their settings::

    usb_passthrough:
      buildvm:
        devices:                     # selectors, one device each
          - {id: "0951:1666:E0D55EA5741AF160B9740A81"}
          - {vendor_id: "0403", product_id: "6001", port: "1-5.1"}
          - {host: kvm1, id: "46f4:0001:KING0001"}    # plugged into kvm1, imported over USB/IP
        controller: qemu-xhci        # or the options of qemu_usb_controller
        auto_start: false
        exclusive: false
        steal: false

A selector chooses a device by any of its device fields (all given must match): ``id`` (as usb_facts reports it,
``vvvv:pppp:SERIAL`` or ``vvvv:pppp@PORT``), ``vendor_id`` and ``product_id``, ``serial``, ``port`` (``2-1.4``),
``address`` (``BBB:DDD``); ad hoc it may be a string (an id, ``vvvv:pppp``, ``BBB:DDD`` or a port). With ``host`` it
chooses a device plugged into that other KVM host of the inventory, reached at ``link_address`` on USB/IP port
``link_port`` (both filled in from the inventory by the action plugins); its device fields apply there.

``usb_fleet`` (group vars) has the same shape, keyed by domain alone wherever the domain is defined, and every
selector in it names its ``host`` (``normalize_fleet``).
"""

from __future__ import annotations

import re

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import ExportError, PassthroughError, SelectorError

HEX4 = re.compile(r"^[0-9a-fA-F]{4}$")
ADDRESS = re.compile(r"^(\d{1,3}):(\d{1,3})$")
PORT = re.compile(r"^\d+-\d+(\.\d+)*$")
VENDOR_PRODUCT = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{4})$")
DEVICE_ID = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{4})(?::([A-Za-z0-9._~%-]+)|@(\d+-\d+(?:\.\d+)*))$")

DEVICE_FIELDS = ("id", "vendor_id", "product_id", "serial", "port", "address")
# A selector with host chooses a device plugged into that other KVM host of the inventory, reached at
# link_address, on USB/IP port link_port (both filled in by the action plugins from the inventory); its device fields
# apply there.
REMOTE_FIELDS = ("host", "link_address", "link_port")
SELECTOR_FIELDS = DEVICE_FIELDS + REMOTE_FIELDS
# What the intent records of a selector: link_address and link_port are where the host was reached, recorded beside it.
RECORDED_FIELDS = DEVICE_FIELDS + ("host",)
HOST_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@:-]*$")
LINK_ADDRESS = re.compile(r"^[A-Za-z0-9_.:%-]+$")

DOMAIN_SETTINGS = ("devices", "exclusive", "auto_start", "steal", "controller")
# The settings that are switches.
FLAGS = ("exclusive", "auto_start", "steal")
# An export (the usb_exports filter's, usb_export's): a selector's device fields and who it is for.
EXPORT_FIELDS = ("importer", "importer_address", "domain")


def normalize_selector(selector):
    """Validate a selector (dict or ad-hoc string) and return it as a dict of normalised fields."""
    if isinstance(selector, str):
        return _parse_selector_string(selector)
    if not isinstance(selector, dict):
        raise SelectorError("A device selector must be a dict or a string, got %r" % (selector,))
    unknown = sorted(set(selector) - set(SELECTOR_FIELDS))
    if unknown:
        raise SelectorError("Unknown selector field(s) %s; accepted: %s" % (", ".join(unknown), ", ".join(SELECTOR_FIELDS)))
    normalized = {}
    for field in SELECTOR_FIELDS:
        value = selector.get(field)
        if value is None or value == "":
            continue
        value = str(value).strip()
        if field in ("vendor_id", "product_id"):
            value = value.lower()
            if value.startswith("0x"):
                value = value[2:]
            if not HEX4.match(value):
                raise SelectorError("Malformed %s %r: expected 4 hexadecimal digits such as 0951" % (field, selector[field]))
        elif field == "address":
            match = ADDRESS.match(value)
            if not match or not (0 < int(match.group(1)) < 256 and 0 < int(match.group(2)) < 256):
                raise SelectorError("Malformed address %r: expected BBB:DDD (bus and device number) such as 002:005" % selector[field])
            value = "%03d:%03d" % (int(match.group(1)), int(match.group(2)))
        elif field == "port":
            if not PORT.match(value):
                raise SelectorError("Malformed port %r: expected a port path such as 2-1.4" % selector[field])
        elif field == "id":
            if not DEVICE_ID.match(value):
                raise SelectorError(
                    "Malformed id %r: expected vvvv:pppp:SERIAL or vvvv:pppp@PORT as usb_facts reports it" % selector[field]
                )
        elif field == "host":
            if not HOST_NAME.match(value):
                raise SelectorError("Malformed host %r: expected the inventory name of a KVM host such as kvm1" % selector[field])
        elif field == "link_address":
            if not LINK_ADDRESS.match(value):
                raise SelectorError("Malformed link_address %r: expected an IP address or a host name" % selector[field])
        elif field == "link_port":
            if not value.isdigit() or not 0 < int(value) < 65536:
                raise SelectorError("Malformed link_port %r: expected a TCP port number such as 3240" % selector[field])
            value = str(int(value))
        normalized[field] = value
    if not any(field in normalized for field in DEVICE_FIELDS):
        raise SelectorError("Empty device selector: give at least one of %s" % ", ".join(DEVICE_FIELDS))
    for field in ("link_address", "link_port"):
        if field in normalized and "host" not in normalized:
            raise SelectorError("Selector (%s) has a %s but no host: %s is where host is reached" % (describe_selector(normalized), field, field))
    return normalized


def is_remote(selector):
    """Whether the selector chooses a device of another KVM host."""
    return "host" in selector


def device_fields(selector):
    """The fields of a selector that describe the device itself (on whichever host it is plugged into)."""
    return dict((field, selector[field]) for field in DEVICE_FIELDS if field in selector)


def recorded_selector(selector):
    """The selector as the intent records it and compares it (without link_address)."""
    return dict((field, selector[field]) for field in RECORDED_FIELDS if field in selector)


def _parse_selector_string(text):
    text = text.strip()
    match = VENDOR_PRODUCT.match(text)
    if match:
        return {"vendor_id": match.group(1).lower(), "product_id": match.group(2).lower()}
    if ADDRESS.match(text):
        return normalize_selector({"address": text})
    if PORT.match(text):
        return {"port": text}
    if DEVICE_ID.match(text):
        return {"id": text}
    raise SelectorError(
        "Cannot read device selector %r: expected an id (vvvv:pppp:SERIAL or vvvv:pppp@PORT), vvvv:pppp, BBB:DDD or a port path" % text
    )


def describe_selector(selector):
    return ", ".join("%s=%s" % (field, selector[field]) for field in ("host",) + DEVICE_FIELDS if field in selector)


def normalize_selectors(items: list, allow_empty: bool = False) -> list[dict]:
    """The ``devices`` of usb_attach and usb_detach, normalised."""
    if not items and not allow_empty:
        raise SelectorError("No devices given: 'devices' needs at least one selector")
    return [normalize_selector(item) for item in items]


def normalize_declaration(domains: dict) -> dict:
    """``{name: {"devices": [selectors], "exclusive", "auto_start", "steal"}}`` from a host's usb_passthrough (the role's
    variable, the module usb_passthrough's ``domains``); the first malformed entry fails, naming its domain."""
    if not isinstance(domains, dict):
        raise PassthroughError("domains must map domain names to their settings, got %r" % (domains,))
    declaration = {}
    for name, settings in domains.items():
        settings = settings if settings is not None else {}
        if not isinstance(settings, dict):
            raise PassthroughError("Domain %s: its settings must be a mapping of %s, got %r" % (name, ", ".join(DOMAIN_SETTINGS), settings))
        unknown = sorted(set(settings) - set(DOMAIN_SETTINGS))
        if unknown:
            raise PassthroughError("Domain %s: unknown setting(s) %s; accepted: %s" % (name, ", ".join(unknown), ", ".join(DOMAIN_SETTINGS)))
        devices = settings.get("devices") or []
        if not isinstance(devices, list):
            raise PassthroughError("Domain %s: devices must be a list of selectors, got %r" % (name, devices))
        try:
            selectors = [normalize_selector(item) for item in devices]
        except SelectorError as error:
            raise PassthroughError("Domain %s: %s" % (name, error))
        declaration[str(name)] = dict([(key, bool(settings.get(key))) for key in FLAGS], devices=selectors)
    return declaration


def normalize_fleet(domains: dict) -> dict:
    """``usb_fleet``: a declaration (``normalize_declaration``) keyed by domain alone, whose every selector names the
    host its device is plugged into; the first bad entry fails, naming its domain."""
    declaration = normalize_declaration(domains)
    for name, settings in declaration.items():
        for selector in settings["devices"]:
            if not is_remote(selector):
                raise PassthroughError(
                    "Domain %s: selector (%s) names no host; in usb_fleet each device says the host it is plugged into (host: kvm1)"
                    % (name, describe_selector(selector))
                )
    return declaration


def normalize_exports(exports):
    """``[{"selector", "importer", "importer_address", "domain"}]`` from the module's list; the first bad entry fails."""
    if not isinstance(exports, list):
        raise ExportError("exports must be a list, got %r" % (exports,))
    normalized = []
    for index, item in enumerate(exports):
        if not isinstance(item, dict):
            raise ExportError("exports[%d] must be a mapping of selector fields, %s; got %r" % (index, ", ".join(EXPORT_FIELDS), item))
        missing = [field for field in EXPORT_FIELDS if not item.get(field)]
        if missing:
            raise ExportError("exports[%d] (%r) lacks %s" % (index, item, ", ".join(missing)))
        unknown = sorted(set(item) - set(EXPORT_FIELDS) - set(SELECTOR_FIELDS))
        if unknown:
            accepted = ", ".join(SELECTOR_FIELDS + EXPORT_FIELDS)
            raise ExportError("exports[%d]: unknown field(s) %s; accepted: %s" % (index, ", ".join(unknown), accepted))
        selector = dict((field, item[field]) for field in SELECTOR_FIELDS if field in item)
        try:
            selector = normalize_selector(selector)
        except SelectorError as error:
            raise ExportError("exports[%d] for domain %s on %s: %s" % (index, item["domain"], item["importer"], error))
        normalized.append(dict((field, str(item[field])) for field in EXPORT_FIELDS))
        normalized[-1]["selector"] = selector
    return normalized


def local_declaration(domains):
    """The host's own declaration without the devices it imports from other hosts."""
    local = {}
    for name, settings in (domains or {}).items():
        settings = dict(settings or {})
        devices = settings.get("devices") or []
        if isinstance(devices, list):
            settings["devices"] = [item for item in devices if not (isinstance(item, dict) and any(item.get(field) for field in ("host", "link_address")))]
        local[name] = settings
    return local
