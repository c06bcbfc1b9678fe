# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""USB device enumeration from udev, stable ids, topology and selectors.

The id rule (also in the usb_facts documentation):

* ``vvvv:pppp:SERIAL`` when the device has a serial number and no other device of the
  same vendor:product on this host has the same serial;
* ``vvvv:pppp@PORT`` otherwise, PORT being the sysfs port path such as ``2-1.4``.

Characters of the serial outside ``A-Z a-z 0-9 . _ ~ -`` are percent-encoded, so an id
never contains a space, a colon or an ``@`` of the serial itself.
"""

from __future__ import annotations

import os
import re
import traceback

from urllib.parse import quote

PYUDEV_IMPORT_ERROR = None
try:
    import pyudev
except ImportError:
    pyudev = None
    PYUDEV_IMPORT_ERROR = traceback.format_exc()

PYUDEV_REQUIREMENT = "pyudev (Debian/Ubuntu: python3-pyudev, RHEL family: python3-pyudev, or pip install pyudev)"

HUB_CLASS = 0x09

# USB-IF base class codes, as lsusb -t names them.
CLASS_NAMES = {
    0x00: "Per-interface",
    0x01: "Audio",
    0x02: "Communications",
    0x03: "Human Interface Device",
    0x05: "Physical Interface Device",
    0x06: "Image",
    0x07: "Printer",
    0x08: "Mass Storage",
    0x09: "Hub",
    0x0A: "CDC Data",
    0x0B: "Chip/SmartCard",
    0x0D: "Content Security",
    0x0E: "Video",
    0x0F: "Personal Healthcare",
    0x10: "Audio/Video",
    0x11: "Billboard",
    0x12: "Type-C Bridge",
    0xDC: "Diagnostic",
    0xE0: "Wireless",
    0xEF: "Miscellaneous Device",
    0xFE: "Application Specific Interface",
    0xFF: "Vendor Specific Class",
}

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


class SelectorError(ValueError):
    """A selector is malformed, matches nothing, or matches more than one device."""


def _text(value):
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = value.strip()
    return value or None


def _hex_byte(value):
    try:
        return int(value, 16)
    except (TypeError, ValueError):
        return None


def _number(value):
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if number.is_integer() else number


def encode_serial(serial):
    return quote(serial, safe="-._~")


def class_names(codes):
    names = []
    for code in codes:
        name = CLASS_NAMES.get(code, "Class 0x%02x" % code)
        if name not in names:
            names.append(name)
    return names


# What read_device takes from sysfs, one file each: the kernel's attributes of a usb_device
# (Documentation/ABI/stable/sysfs-bus-usb) and of each of its interfaces.
DEVICE_ATTRIBUTES = ("idVendor", "idProduct", "bDeviceClass", "busnum", "devnum", "manufacturer", "product", "serial", "speed", "version")


def _read_attribute(path):
    """The raw bytes of one sysfs attribute file, None when it is absent or unreadable.

    One os.read: sysfs hands out an attribute (at most a page) in a single read, and os.open
    spares the buffered-file machinery of open(), which is most of the cost of a small read.
    Cut at the first NUL, as libudev's C string of the same attribute would be.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).partition(b"\0")[0]
    except OSError:
        return None
    finally:
        os.close(fd)


def _attribute(path):
    return _text(_read_attribute(path))


def _interfaces(sys_path, prefix):
    """Interface class codes and bound drivers of the usb_device at sys_path, in udev's order.

    The kernel puts the interfaces of a device's active configuration in the device's own
    directory, named ``PREFIX:CONFIG.NUMBER`` (PREFIX ``2-1.4``, or ``2-0`` for root hub usb2);
    libudev lists them in strcmp order of their paths, so sorting the names gives the same order.
    """
    try:
        names = sorted(name for name in os.listdir(sys_path) if name.startswith(prefix + ":"))
    except OSError:
        names = []
    interface_classes = []
    drivers = []
    for name in names:
        path = sys_path + "/" + name
        code = _hex_byte(_attribute(path + "/bInterfaceClass"))
        if code is not None and code not in interface_classes:
            interface_classes.append(code)
        try:
            driver = os.path.basename(os.readlink(path + "/driver"))
        except OSError:
            driver = None
        if driver and driver not in drivers:
            drivers.append(driver)
    return interface_classes, drivers


def read_device(device):
    """Describe one pyudev USB device (DEVTYPE usb_device) and its interfaces as a plain dict, without id.

    udev (pyudev) found the device and gives its udev properties (the hwdb names); the
    kernel's own attributes are read as plain files under its sys_path, one read each:
    the same bytes libudev would hand back, without a trip through ctypes and libudev.
    """
    properties = device.properties
    sys_name = device.sys_name
    sys_path = device.sys_path
    attributes = dict((name, _attribute(sys_path + "/" + name)) for name in DEVICE_ATTRIBUTES)

    vendor_id = (attributes["idVendor"] or "").lower()
    product_id = (attributes["idProduct"] or "").lower()
    device_class = _hex_byte(attributes["bDeviceClass"])
    busnum = _number(attributes["busnum"])
    devnum = _number(attributes["devnum"])

    interface_classes, drivers = _interfaces(sys_path, _interface_prefix(sys_name))

    manufacturer_string = attributes["manufacturer"]
    product_string = attributes["product"]
    vendor_db = _text(properties.get("ID_VENDOR_FROM_DATABASE"))
    model_db = _text(properties.get("ID_MODEL_FROM_DATABASE"))
    # lsusb prints the database name and falls back to the device's own string.
    model = " ".join(name for name in (vendor_db or manufacturer_string, model_db or product_string) if name)

    is_root_hub = sys_name.startswith("usb")
    codes = [device_class] if device_class else interface_classes
    return {
        "vendor_id": vendor_id,
        "product_id": product_id,
        "vendor_device_id": "%s:%s" % (vendor_id, product_id),
        "manufacturer": manufacturer_string or vendor_db,
        "product": product_string or model_db,
        "model": model or None,
        "serial": attributes["serial"],
        "bus": busnum,
        "device": devnum,
        "address": "%03d:%03d" % (busnum, devnum) if busnum is not None and devnum is not None else None,
        "port": sys_name,
        "speed": _number(attributes["speed"]),
        "usb_version": attributes["version"],
        "class": class_names(codes),
        "driver": ",".join(drivers) or None,
        "is_hub": device_class == HUB_CLASS,
        "is_root_hub": is_root_hub,
        "sys_path": sys_path,
        "parent_port": None if is_root_hub else _parent_port(sys_name, busnum),
    }


def still_plugged(device):
    """Whether a device read earlier is still where it was: its sysfs directory still holds its bus and device
    number, vendor:product and serial (a replug gives it a new device number). Five small reads, no udev."""
    path = device["sys_path"]
    now = (
        _number(_attribute(path + "/busnum")),
        _number(_attribute(path + "/devnum")),
        (_attribute(path + "/idVendor") or "").lower(),
        (_attribute(path + "/idProduct") or "").lower(),
        _attribute(path + "/serial"),
    )
    return now == (device["bus"], device["device"], device["vendor_id"], device["product_id"], device["serial"])


def _parent_port(sys_name, busnum):
    if "." in sys_name:
        return sys_name.rsplit(".", 1)[0]
    return "usb%s" % (busnum if busnum is not None else sys_name.split("-", 1)[0])


def assign_ids(devices):
    """Give every device its stable id, in place (see the module docstring for the rule)."""
    serial_count = {}
    for device in devices:
        if device["serial"]:
            key = (device["vendor_device_id"], device["serial"])
            serial_count[key] = serial_count.get(key, 0) + 1
    for device in devices:
        serial = device["serial"]
        if serial and serial_count[(device["vendor_device_id"], serial)] == 1:
            device["id"] = "%s:%s" % (device["vendor_device_id"], encode_serial(serial))
        else:
            device["id"] = "%s@%s" % (device["vendor_device_id"], device["port"])
    return devices


def enumerate_devices(context=None):
    """Every USB device of the host, root hubs and hubs included, with ids, sorted by port.

    The kernel's own list of USB devices is the directory /sys/bus/usb/devices (entries without a
    colon; those with one are interfaces); each device is then opened through pyudev, which gives
    its udev properties such as the hwdb names. Asking libudev to enumerate instead scans the same
    directory and costs 2.5x a plain sysfs walk before a single attribute is read
    (benchmarks/usb_facts_enumeration.py).
    """
    if context is None:
        context = pyudev.Context()
    bus_directory = os.path.join(context.sys_path, "bus", "usb", "devices")
    try:
        names = os.listdir(bus_directory)
    except FileNotFoundError:
        return []
    devices = []
    for name in names:
        if ":" in name:
            continue
        try:
            device = pyudev.Devices.from_sys_path(context, os.path.join(bus_directory, name))
        except pyudev.DeviceNotFoundError:
            continue  # unplugged while we looked
        devices.append(read_device(device))
    devices.sort(key=lambda device: (device["bus"] or 0, _port_key(device["port"])))
    return assign_ids(devices)


def _interface_prefix(sys_name):
    # Root hub usb2 names its interfaces 2-0:1.0.
    return sys_name[3:] + "-0" if sys_name.startswith("usb") else sys_name


def _port_key(port):
    if port.startswith("usb"):
        return ()
    return tuple(int(part) for part in re.split(r"[-.]", port) if part.isdigit())


def build_topology(devices):
    """The device tree like ``lsusb -t``: root hubs with nested ``children``."""
    nodes = {}
    for device in devices:
        node = dict((key, device[key]) for key in ("id", "port", "bus", "device", "model", "class", "driver", "speed", "is_hub"))
        node["children"] = []
        nodes[device["port"]] = node
    roots = []
    for device in devices:
        parent = nodes.get(device["parent_port"]) if device["parent_port"] else None
        (parent["children"] if parent else roots).append(nodes[device["port"]])
    return roots


def public_view(device):
    """What a module returns of a device: the internal helper fields stripped."""
    return dict((key, value) for key, value in device.items() if key not in ("is_root_hub", "parent_port"))


def passthrough_candidates(devices):
    return [device for device in devices if not device["is_hub"] and not device["is_root_hub"]]


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


def selector_matches(selector, device):
    """Every field of the selector matches the device. A device of this host has no host field, so a selector
    naming another host never matches one: that device is found through its import (see _crosshost)."""
    for field, wanted in selector.items():
        if device.get(field) != wanted:
            return False
    return True


def describe_device(device):
    return "%s (%s, serial %s, port %s, address %s)" % (
        device["id"],
        device["model"] or "unnamed",
        device["serial"] or "none",
        device["port"],
        device["address"],
    )


def distinguishing_field(candidates):
    for field in ("serial", "port"):
        values = [device[field] for device in candidates]
        if all(values) and len(set(values)) == len(values):
            return field
    return "port"


def select_device(devices, selector):
    """The one passthrough candidate matching every field of a normalised selector."""
    candidates = passthrough_candidates(devices)
    matches = [device for device in candidates if selector_matches(selector, device)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        hubs = [device for device in devices if device not in candidates and selector_matches(selector, device)]
        if hubs:
            raise SelectorError(
                "Device selector (%s) matches a hub, which is never passed through: %s" % (describe_selector(selector), describe_device(hubs[0]))
            )
        vendor_product = _vendor_product_of(selector)
        related = [device for device in candidates if vendor_product and device["vendor_device_id"] == vendor_product]
        present = "; ".join(describe_device(device) for device in related) if related else "none"
        raise SelectorError(
            "No USB device matches (%s). Present with %s: %s"
            % (describe_selector(selector), vendor_product or "that vendor:product", present)
        )
    field = distinguishing_field(matches)
    raise SelectorError(
        "Device selector (%s) is ambiguous: %d devices match: %s. Add '%s' to the selector to choose one."
        % (describe_selector(selector), len(matches), "; ".join(describe_device(device) for device in matches), field)
    )


def _vendor_product_of(selector):
    if "id" in selector:
        return selector["id"][:9]
    if "vendor_id" in selector and "product_id" in selector:
        return "%s:%s" % (selector["vendor_id"], selector["product_id"])
    return None


def filter_devices(devices, filters):
    """Devices matching every non-empty filter (vendor_id, product_id, serial, port)."""
    wanted = dict((key, value) for key, value in filters.items() if value)
    return [device for device in devices if selector_matches(wanted, device)]
