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

from urllib.parse import quote, unquote

from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import DEVICE_FIELDS, DEVICE_ID, describe_selector
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import SelectorError

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


def id_of(vendor_id, product_id, serial=None, port=None):
    """A device's id by the rule above: serial-based when ``serial`` is given, else port-based."""
    if serial:
        return "%s:%s:%s" % (vendor_id, product_id, encode_serial(serial))
    return "%s:%s@%s" % (vendor_id, product_id, port)


def id_fields(device_id):
    """The fields an id carries: vendor_id, product_id, and serial or port; none for what is not an id."""
    match = DEVICE_ID.match(device_id or "")
    if not match:
        return {}
    fields = {"vendor_id": match.group(1), "product_id": match.group(2)}
    if match.group(3):
        fields["serial"] = unquote(match.group(3))
    else:
        fields["port"] = match.group(4)
    return fields


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
        unique = serial and serial_count[(device["vendor_device_id"], serial)] == 1
        device["id"] = id_of(device["vendor_id"], device["product_id"], serial if unique else None, device["port"])
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


def selector_matches(selector, device):
    """Every field of the selector matches the device. A device of this host has no host field, so a selector
    naming another host never matches one: that device is found through its import (see _crosshost)."""
    for field, wanted in selector.items():
        if device.get(field) != wanted:
            return False
    return True


def wanted_fields(selector):
    """The device fields a selector asks for, those its id carries included."""
    fields = dict((field, selector[field]) for field in DEVICE_FIELDS if field != "id" and selector.get(field))
    fields.update(id_fields(selector.get("id")))
    return fields


def fields_match(selector, device, fields):
    """Whether the device (a plain dict of device fields) has each of ``fields`` the selector asks for: for a device
    known by some of its fields only, such as one another host offers over USB/IP."""
    wanted = wanted_fields(selector)
    return all(device.get(field) == wanted[field] for field in fields if field in wanted)


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
