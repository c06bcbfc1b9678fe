# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""USB/IP across KVM hosts: a device plugged into host A used by a domain on host B.

The kernel does the data path (``usbip-host`` on A, ``vhci-hcd`` on B); this file speaks the standard USB/IP
wire protocol around it (the Linux kernel's Documentation/usb/usbip_protocol.rst), in place of ``usbipd`` and
``usbip attach``:

* the exporter (A): ``python3 -m ansible_collections.kvmhost.usb.plugins.module_utils._usbip serve``, the
  service ``kvmhost-usb-exporter``. It binds each present device of the exports table
  (``/etc/kvmhost-usb/exports.json``, written by the module usb_export) to ``usbip-host``, again after a
  replug, gives back the devices no longer exported, and listens on the host's link address only. A peer is
  answered only with the exports declared for its address; a connection from any other address is closed at
  once. An accepted import hands the socket to the kernel (``usbip_sockfd``), as usbipd does.
* the importer (B): ``import_device`` asks A for a device (OP_REQ_IMPORT) and hands the socket to
  ``vhci-hcd`` (``attach``); the device then is a local USB device of B, so ids, hostdevs, the planner and the
  agent apply as they are. ``ensure_import`` and ``release_import`` are what the modules and the agent call;
  each import is recorded in ``/run/kvmhost-usb/imports/<vhci port>.json``.

Neither end needs the ``usbip`` tools; ``usbip list -r A`` from B still works, for the exports of B.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

USBIP_PORT = 3240
USBIP_VERSION = 0x0111
EXPORTS_PATH = "/etc/kvmhost-usb/exports.json"
# Tests point this at a file of their own; operators have no reason to.
EXPORTS_PATH_ENV = "KVMHOST_USB_EXPORTS"
IMPORTS_DIR = "/run/kvmhost-usb/imports"
# The devices the exporter bound to usbip-host, so that a restarted exporter gives back those no longer exported.
EXPORTED_PATH = "/run/kvmhost-usb/exported.json"

SYS_USB = "/sys/bus/usb"
USBIP_HOST = SYS_USB + "/drivers/usbip-host"
VHCI = "/sys/devices/platform/vhci_hcd.0"

OP_REQ_DEVLIST = 0x8005
OP_REP_DEVLIST = 0x0005
OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT = 0x0003
# kvmhost.usb's own request, not in the USB/IP protocol: the importer gives an export back when its host takes the
# device back (usb_detach), so that the exporting host stops exporting it without another run there.
OP_REQ_RELEASE = 0x8F01
OP_REP_RELEASE = 0x0F01

# The status of a reply (usbip_common.h).
ST_OK = 0
ST_NA = 1
ST_DEV_BUSY = 2
ST_DEV_ERR = 3
ST_NODEV = 4
ST_ERROR = 5
STATUS_TEXT = {ST_NA: "not available", ST_DEV_BUSY: "busy", ST_DEV_ERR: "device error", ST_NODEV: "no such device", ST_ERROR: "error"}

# usbip-host's usbip_status of a bound device (stub.h), vhci's port status (vhci.h).
SDEV_ST_AVAILABLE = 1
SDEV_ST_USED = 2
VDEV_ST_NULL = 4
VDEV_ST_USED = 6

# enum usb_device_speed, from the sysfs ``speed`` attribute (Mbit/s).
USB_SPEED_LOW = 1
USB_SPEED_FULL = 2
USB_SPEED_HIGH = 3
USB_SPEED_WIRELESS = 4
USB_SPEED_SUPER = 5
USB_SPEED_SUPER_PLUS = 6
SPEEDS = {"1.5": USB_SPEED_LOW, "12": USB_SPEED_FULL, "480": USB_SPEED_HIGH, "53.3-480": USB_SPEED_WIRELESS, "5000": USB_SPEED_SUPER}

OP_COMMON = struct.Struct(">HHI")
# struct usbip_usb_device: path[256] busid[32] busnum devnum speed (u32) idVendor idProduct bcdDevice (u16)
# bDeviceClass bDeviceSubClass bDeviceProtocol bConfigurationValue bNumConfigurations bNumInterfaces (u8).
USB_DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
# struct usbip_usb_interface: bInterfaceClass bInterfaceSubClass bInterfaceProtocol padding.
USB_INTERFACE = struct.Struct(">BBBB")
BUSID = struct.Struct(">32s")
COUNT = struct.Struct(">I")


def port_of(value):
    """The USB/IP port a table, record, selector or intent entry names: 3240 when it names none."""
    return int(value or USBIP_PORT)


class UsbipError(Exception):
    """An export or import could not be made; the message says which host, address and device."""


# The wire protocol


def pack_op_common(code, status=ST_OK):
    return OP_COMMON.pack(USBIP_VERSION, code, status)


def unpack_op_common(data):
    version, code, status = OP_COMMON.unpack(data)
    return {"version": version, "code": code, "status": status}


def pack_usb_device(device):
    return USB_DEVICE.pack(
        device["path"].encode(),
        device["busid"].encode(),
        device["busnum"],
        device["devnum"],
        device["speed"],
        int(device["vendor_id"], 16),
        int(device["product_id"], 16),
        device.get("bcd_device", 0),
        device.get("device_class", 0),
        device.get("device_subclass", 0),
        device.get("device_protocol", 0),
        device.get("configuration_value", 1),
        device.get("num_configurations", 1),
        len(device.get("interfaces", [])),
    )


def unpack_usb_device(data):
    fields = USB_DEVICE.unpack(data)
    busnum, devnum = fields[2], fields[3]
    return {
        "path": _c_string(fields[0]),
        "busid": _c_string(fields[1]),
        "busnum": busnum,
        "devnum": devnum,
        "speed": fields[4],
        "vendor_id": "%04x" % fields[5],
        "product_id": "%04x" % fields[6],
        "bcd_device": fields[7],
        "device_class": fields[8],
        "device_subclass": fields[9],
        "device_protocol": fields[10],
        "configuration_value": fields[11],
        "num_configurations": fields[12],
        "num_interfaces": fields[13],
        "devid": devid(busnum, devnum),
    }


def pack_devlist_reply(devices):
    """OP_REP_DEVLIST: the header, the count, and each device followed by its interfaces."""
    data = pack_op_common(OP_REP_DEVLIST) + COUNT.pack(len(devices))
    for device in devices:
        data += pack_usb_device(device)
        for interface in device.get("interfaces", []):
            data += USB_INTERFACE.pack(interface[0], interface[1], interface[2], 0)
    return data


def pack_import_request(busid):
    return pack_op_common(OP_REQ_IMPORT) + BUSID.pack(busid.encode())


def devid(busnum, devnum):
    return (busnum << 16) | devnum


def _c_string(data):
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def _receive(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed the connection after %d of %d bytes" % (len(data), size))
        data += chunk
    return data


def _receive_op_common(sock, expected):
    reply = unpack_op_common(_receive(sock, OP_COMMON.size))
    if reply["version"] != USBIP_VERSION:
        raise UsbipError("USB/IP version 0x%04x in the reply, expected 0x%04x" % (reply["version"], USBIP_VERSION))
    if reply["code"] != expected:
        raise UsbipError("USB/IP reply code 0x%04x, expected 0x%04x" % (reply["code"], expected))
    return reply


# sysfs


def _read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _write(path, text):
    """Write one sysfs attribute; the kernel's refusal as a UsbipError naming the file."""
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError as error:
        raise UsbipError("Cannot write %r to %s: %s" % (text, path, error.strerror or error))


def _hex(value, default=0):
    try:
        return int(value, 16)
    except (TypeError, ValueError):
        return default


def _int(value, default=0):
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def sysfs_device(busid, root=SYS_USB):
    """A USB device of this host as usbip_usb_device describes it, read from sysfs; None when absent."""
    base = os.path.join(root, "devices", busid)
    if _read(os.path.join(base, "idVendor")) is None:
        return None
    configuration = _int(_read(os.path.join(base, "bConfigurationValue")), 0)
    interfaces = []
    for number in range(_int(_read(os.path.join(base, "bNumInterfaces")), 0)):
        interface = os.path.join(base, "%s:%d.%d" % (busid, configuration, number))
        interfaces.append(tuple(_hex(_read(os.path.join(interface, name))) for name in ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol")))
    busnum = _int(_read(os.path.join(base, "busnum")))
    devnum = _int(_read(os.path.join(base, "devnum")))
    return {
        "path": os.path.realpath(base),
        "busid": busid,
        "busnum": busnum,
        "devnum": devnum,
        "speed": SPEEDS.get(_read(os.path.join(base, "speed")) or "", USB_SPEED_SUPER_PLUS),
        "vendor_id": _read(os.path.join(base, "idVendor")),
        "product_id": _read(os.path.join(base, "idProduct")),
        "serial": _read(os.path.join(base, "serial")),
        "bcd_device": _hex(_read(os.path.join(base, "bcdDevice"))),
        "device_class": _hex(_read(os.path.join(base, "bDeviceClass"))),
        "device_subclass": _hex(_read(os.path.join(base, "bDeviceSubClass"))),
        "device_protocol": _hex(_read(os.path.join(base, "bDeviceProtocol"))),
        "configuration_value": configuration,
        "num_configurations": _int(_read(os.path.join(base, "bNumConfigurations")), 1),
        "interfaces": interfaces,
        "devid": devid(busnum, devnum),
    }


def driver_of(busid, root=SYS_USB):
    try:
        return os.path.basename(os.readlink(os.path.join(root, "devices", busid, "driver")))
    except OSError:
        return None


def bind(busid, root=SYS_USB):
    """Bind a device to usbip-host (as ``usbip bind``); True when it was not bound to it before."""
    if driver_of(busid, root) == "usbip-host":
        return False
    if not os.path.isdir(os.path.join(root, "drivers", "usbip-host")):
        raise UsbipError("The kernel module usbip-host is not loaded (modprobe usbip-host)")
    current = driver_of(busid, root)
    if current:
        _write(os.path.join(root, "drivers", current, "unbind"), busid)
    _write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "add %s" % busid)
    try:
        _write(os.path.join(root, "drivers", "usbip-host", "bind"), busid)
    except UsbipError:
        _write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "del %s" % busid)
        _write(os.path.join(root, "drivers_probe"), busid)
        raise
    return True


def unbind(busid, root=SYS_USB):
    """Take a device from usbip-host and give it back to its own driver (as ``usbip unbind``); True when it was bound."""
    bound = driver_of(busid, root) == "usbip-host"
    if bound:
        _write(os.path.join(root, "drivers", "usbip-host", "unbind"), busid)
    if os.path.isdir(os.path.join(root, "drivers", "usbip-host")):
        try:
            _write(os.path.join(root, "drivers", "usbip-host", "match_busid"), "del %s" % busid)
        except UsbipError:
            pass  # not in the table
    if bound and os.path.isdir(os.path.join(root, "devices", busid)):
        _write(os.path.join(root, "drivers_probe"), busid)
    return bound


def stub_status(busid, root=SYS_USB):
    return _int(_read(os.path.join(root, "devices", busid, "usbip_status")), 0)


# The exports table


def exports_path(path=None):
    return path or os.environ.get(EXPORTS_PATH_ENV) or EXPORTS_PATH


def read_exports(path=None):
    """The exports table (``{"listen", "port", "exports": [...]}``); an empty one when there is no file."""
    path = exports_path(path)
    try:
        with open(path) as handle:
            table = json.load(handle)
    except FileNotFoundError:
        return {"listen": None, "port": USBIP_PORT, "exports": []}
    except (OSError, ValueError) as error:
        raise UsbipError("Cannot read the exports table %s: %s" % (path, error))
    table.setdefault("port", USBIP_PORT)
    table.setdefault("exports", [])
    return table


def write_exports(table, path=None):
    """Write the exports table atomically; True when its content changed."""
    path = exports_path(path)
    try:
        if read_exports(path) == table and os.path.exists(path):
            return False
    except UsbipError:
        pass  # an unreadable table is replaced
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".exports-", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(table, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return True


# The importer (host B)


def _connect(address, port, timeout):
    try:
        return socket.create_connection((address, port), timeout=timeout)
    except socket.timeout:
        raise UsbipError("Cannot reach %s:%d: no answer within %g s (host down, link down or a firewall)" % (address, port, timeout))
    except ConnectionRefusedError:
        raise UsbipError("Cannot reach %s:%d: connection refused (is kvmhost-usb-exporter running there?)" % (address, port))
    except OSError as error:
        raise UsbipError("Cannot reach %s:%d: %s" % (address, port, error.strerror or error))


def _talk(address, port, what, work):
    """Run ``work()``; a connection the exporter closed at once is a refusal of this host."""
    try:
        return work()
    except (EOFError, ConnectionResetError):
        raise UsbipError("%s:%d closed the connection on %s: it declares no export for this host" % (address, port, what))
    except socket.timeout:
        raise UsbipError("%s:%d did not answer %s in time" % (address, port, what))
    except OSError as error:
        raise UsbipError("%s:%d: %s failed: %s" % (address, port, what, error.strerror or error))


def remote_devices(address, port=USBIP_PORT, timeout=5.0):
    """The devices the exporter at ``address`` offers this host (OP_REQ_DEVLIST): dicts with busid, vendor_id,
    product_id, speed, devid, busnum, devnum, path and interfaces."""
    sock = _connect(address, port, timeout)

    def work():
        sock.sendall(pack_op_common(OP_REQ_DEVLIST))
        reply = _receive_op_common(sock, OP_REP_DEVLIST)
        if reply["status"] != ST_OK:
            raise UsbipError("%s:%d refused the device list: %s" % (address, port, STATUS_TEXT.get(reply["status"], reply["status"])))
        devices = []
        for _index in range(COUNT.unpack(_receive(sock, COUNT.size))[0]):
            device = unpack_usb_device(_receive(sock, USB_DEVICE.size))
            device["interfaces"] = [USB_INTERFACE.unpack(_receive(sock, USB_INTERFACE.size))[0:3] for _i in range(device["num_interfaces"])]
            devices.append(device)
        return devices

    try:
        return _talk(address, port, "the device list", work)
    finally:
        sock.close()


def _vhci_names(root=VHCI):
    return sorted(name for name in _listdir(os.path.dirname(root)) if name.startswith("vhci_hcd."))


def load_vhci(root=VHCI, timeout=10.0):
    """Load vhci-hcd unless its controllers are there: a host's first import, by a module, may come before the agent
    (whose unit loads it) is installed. True when it was loaded now."""
    if _vhci_names(root):
        return False
    if root != VHCI:
        raise UsbipError("The kernel module vhci-hcd is not loaded (no vhci_hcd.* beside %s)" % root)
    try:
        result = subprocess.run(["modprobe", "vhci-hcd"], capture_output=True, text=True, check=False)
    except OSError as error:
        raise UsbipError("Cannot run modprobe to load the kernel module vhci-hcd: %s" % error)
    if result.returncode != 0:
        raise UsbipError(
            "Cannot load the kernel module vhci-hcd (%s); it ships with the kernel: linux-image-amd64 on Debian,"
            " kernel-modules-extra on RHEL-family hosts" % (result.stderr.strip() or "modprobe exited %d" % result.returncode)
        )
    deadline = time.monotonic() + timeout
    while not _vhci_names(root):
        if time.monotonic() > deadline:
            raise UsbipError("vhci-hcd was loaded but no vhci_hcd controller appeared under %s" % os.path.dirname(root))
        time.sleep(0.1)
    return True


def vhci_ports(root=VHCI):
    """Every port of the vhci controllers: hub (hs or ss), port, status, speed, devid, local_busid."""
    names = _vhci_names(root)
    if not names:
        raise UsbipError("The kernel module vhci-hcd is not loaded (modprobe vhci-hcd)")
    ports = []
    for name in names:
        directory = os.path.join(os.path.dirname(root), name)
        for status in sorted(entry for entry in _listdir(directory) if entry == "status" or entry.startswith("status.")):
            ports.extend(parse_vhci_status(_read(os.path.join(directory, status)) or ""))
    return sorted(ports, key=lambda item: item["port"])


def parse_vhci_status(text):
    """The lines of a vhci status file: ``hub port sta spd dev sockfd local_busid``."""
    ports = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 7 or fields[0] not in ("hs", "ss"):
            continue
        ports.append(
            {
                "hub": fields[0],
                "port": int(fields[1]),
                "status": int(fields[2]),
                "speed": int(fields[3]),
                "devid": int(fields[4], 16),
                "local_busid": None if fields[6] == "0-0" else fields[6],
            }
        )
    return ports


def free_port(ports, speed):
    """The first free vhci port of the hub for this speed: SuperSpeed devices need an ss port, others an hs one."""
    hub = "ss" if speed == USB_SPEED_SUPER else "hs"
    for item in ports:
        if item["hub"] == hub and item["status"] == VDEV_ST_NULL:
            return item["port"]
    raise UsbipError("No free %s port on vhci-hcd (all %d in use)" % (hub, len([item for item in ports if item["hub"] == hub])))


def _listdir(path):
    try:
        return os.listdir(path)
    except OSError:
        return []


def import_device(address, busid, port=USBIP_PORT, host=None, device_id=None, timeout=5.0, vhci=VHCI, directory=None):
    """Import ``busid`` from the exporter at ``address`` (OP_REQ_IMPORT) and attach it to a free vhci port,
    as ``usbip attach`` does; returns the vhci port. Records the import when ``host`` or ``device_id`` is given."""
    vhci_ports(vhci)  # vhci-hcd is loaded, before anything is asked of the exporter
    sock = _connect(address, port, timeout)

    def work():
        sock.sendall(pack_import_request(busid))
        reply = _receive_op_common(sock, OP_REP_IMPORT)
        if reply["status"] != ST_OK:
            raise UsbipError("%s:%d refused to export %s to this host: %s" % (address, port, busid, STATUS_TEXT.get(reply["status"], reply["status"])))
        return unpack_usb_device(_receive(sock, USB_DEVICE.size))

    try:
        device = _talk(address, port, "the import of %s" % busid, work)
        if device["busid"] != busid:
            raise UsbipError("%s:%d answered the import of %s with device %s" % (address, port, busid, device["busid"]))
        # The kernel takes its own reference on the socket, blocking as usbip's; ours is closed below.
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        vhci_port = free_port(vhci_ports(vhci), device["speed"])
        _write(os.path.join(vhci, "attach"), "%d %d %d %d" % (vhci_port, sock.fileno(), device["devid"], device["speed"]))
    finally:
        sock.close()
    record = {
        "vhci_port": vhci_port,
        "host": host,
        "link_address": address,
        "port": port,
        "busid": busid,
        "id": device_id,
        "vendor_id": device["vendor_id"],
        "product_id": device["product_id"],
    }
    _write_record(record, directory)
    return vhci_port


def _record_path(vhci_port, directory=None):
    return os.path.join(directory or IMPORTS_DIR, "%d.json" % vhci_port)


def _write_record(record, directory=None):
    path = _record_path(record["vhci_port"], directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(record, handle, sort_keys=True)
    os.rename(path + ".tmp", path)


def _read_records(directory=None):
    records = {}
    directory = directory or IMPORTS_DIR
    for name in _listdir(directory):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as handle:
                record = json.load(handle)
            records[int(record["vhci_port"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return records


def _forget_record(vhci_port, directory=None):
    try:
        os.unlink(_record_path(vhci_port, directory))
    except FileNotFoundError:
        pass


def imports(vhci=VHCI, directory=None):
    """The devices this host imported and still holds: ``{vhci_port, host, link_address, busid, id, local_port}``
    (local_port: the device's port path here, once the kernel enumerated it). A record whose vhci port is no longer
    in use (the exporter, the link or the device went away) is dropped."""
    ports = dict((item["port"], item) for item in vhci_ports(vhci))
    found = []
    for vhci_port, record in sorted(_read_records(directory).items()):
        item = ports.get(vhci_port)
        # Between the attach and the device's enumeration the port is not yet "used"; only a free port is lost.
        if item is None or item["status"] == VDEV_ST_NULL:
            _forget_record(vhci_port, directory)
            continue
        found.append(dict(record, local_port=item["local_busid"]))
    return found


def detach_import(vhci_port, vhci=VHCI, directory=None):
    """Detach a vhci port (the kernel closes the connection, the exporter's device becomes available again)."""
    ports = dict((item["port"], item) for item in vhci_ports(vhci))
    if vhci_port in ports and ports[vhci_port]["status"] != VDEV_ST_NULL:
        _write(os.path.join(vhci, "detach"), "%d" % vhci_port)
    _forget_record(vhci_port, directory)


def _selector_vendor_product(selector):
    if selector.get("id"):
        return selector["id"][0:4], selector["id"][5:9]
    return selector.get("vendor_id"), selector.get("product_id")


def _selector_serial(selector):
    device_id = selector.get("id") or ""
    if len(device_id) > 10 and device_id[9] == ":":
        return _unquote(device_id[10:])
    return selector.get("serial")


def _unquote(text):
    from urllib.parse import unquote

    return unquote(text)


def _selector_port(selector):
    device_id = selector.get("id") or ""
    if "@" in device_id:
        return device_id.split("@", 1)[1]
    return selector.get("port")


def offered_matches(selector, device):
    """Whether a device of a device list can be the one a selector means (the list carries no serial: that is
    checked once the device is local)."""
    vendor_id, product_id = _selector_vendor_product(selector)
    if vendor_id and device["vendor_id"] != vendor_id or product_id and device["product_id"] != product_id:
        return False
    port = _selector_port(selector)
    if port and device["busid"] != port:
        return False
    address = selector.get("address")
    return not address or "%03d:%03d" % (device["busnum"], device["devnum"]) == address


def _local_device(local_port, root=SYS_USB):
    return sysfs_device(local_port, root) if local_port else None


def _local_matches(selector, device):
    serial = _selector_serial(selector)
    return serial is None or device.get("serial") == serial


def _where(host, address, port):
    return "%s (%s:%d)" % (host, address, port) if host else "%s:%d" % (address, port)


def _wait_local(vhci_port, deadline, vhci=VHCI, root=SYS_USB):
    """The local device behind a vhci port once the kernel enumerated it; None when the port went free."""
    while True:
        ports = dict((item["port"], item) for item in vhci_ports(vhci))
        item = ports.get(vhci_port)
        if item is None or item["status"] == VDEV_ST_NULL:
            return None
        device = _local_device(item["local_busid"], root)
        if device is not None and device["vendor_id"]:
            return device
        if time.monotonic() > deadline:
            raise UsbipError("vhci port %d: the imported device did not appear within the timeout" % vhci_port)
        time.sleep(0.2)


def ensure_import(host, link_address, selector, timeout=30.0, port=USBIP_PORT, vhci=VHCI, directory=None):
    """Import the device a selector means from ``host`` at ``link_address`` unless this host holds it already, and
    wait until it is a local USB device; the import record. UsbipError with a clear message otherwise."""
    where = _where(host, link_address, port)
    standing = [record for record in imports(vhci, directory) if _same_exporter(record, link_address, port)]
    for record in standing:
        if _record_matches(selector, record):
            return record
    offered = remote_devices(link_address, port, timeout=min(timeout, 5.0))
    held = set(record["busid"] for record in standing)
    candidates = [device for device in offered if offered_matches(selector, device) and device["busid"] not in held]
    if not candidates:
        listed = ", ".join("%s %s:%s" % (device["busid"], device["vendor_id"], device["product_id"]) for device in offered) or "nothing"
        raise UsbipError(
            "%s offers this host no device matching (%s): not plugged in there, or not exported to this host; it offers: %s"
            % (where, _describe(selector), listed)
        )
    deadline = time.monotonic() + timeout
    for device in candidates:
        vhci_port = import_device(
            link_address, device["busid"], port, host=host, device_id=selector.get("id"), timeout=min(timeout, 5.0), vhci=vhci, directory=directory
        )
        local = _wait_local(vhci_port, deadline, vhci)
        if local is None:
            _forget_record(vhci_port, directory)
            raise UsbipError("%s: the import of %s ended at once (vhci port %d went free)" % (where, device["busid"], vhci_port))
        if _local_matches(selector, local):
            record = {
                "vhci_port": vhci_port,
                "host": host,
                "link_address": link_address,
                "port": port,
                "busid": device["busid"],
                "id": selector.get("id") or _device_id(local),
                "vendor_id": local["vendor_id"],
                "product_id": local["product_id"],
            }
            _write_record(record, directory)
            return dict(record, local_port=local["busid"])
        detach_import(vhci_port, vhci, directory)
    raise UsbipError("%s exports %s, but none with serial %s" % (where, ", ".join(device["busid"] for device in candidates), _selector_serial(selector)))


def _same_exporter(record, link_address, port):
    return record["link_address"] == link_address and port_of(record.get("port")) == int(port)


def _record_matches(selector, record, root=SYS_USB):
    """Whether an import record is the device a selector means: by the id it recorded, else by the local device."""
    if selector.get("id") and record.get("id"):
        return record["id"] == selector["id"]
    local = _local_device(record.get("local_port"), root)
    if local is None:
        return False
    # A port or an address in the selector are the device's on the exporting host, where its busid is its port.
    remote = dict(local, busid=record["busid"])
    return offered_matches(dict((key, value) for key, value in selector.items() if key != "address"), remote) and _local_matches(selector, local)


def _device_id(local):
    if local.get("serial"):
        from urllib.parse import quote

        return "%s:%s:%s" % (local["vendor_id"], local["product_id"], quote(local["serial"], safe="-._~"))
    return "%s:%s@%s" % (local["vendor_id"], local["product_id"], local["busid"])


def _describe(selector):
    return ", ".join("%s=%s" % (key, selector[key]) for key in sorted(selector)) or "any device"


def release_import(host, link_address, device_id, vhci=VHCI, directory=None, give_back=False):
    """Detach this host's import of ``device_id`` from ``link_address``; True when there was one. With
    ``give_back``, also ask the exporter to stop exporting it (``give_back_export``)."""
    changed = False
    for record in imports(vhci, directory):
        if record["link_address"] == link_address and record.get("id") == device_id:
            detach_import(record["vhci_port"], vhci, directory)
            if give_back:
                give_back_export(link_address, record["busid"], port_of(record.get("port")))
            changed = True
    return changed


def give_back_export(address, busid, port=USBIP_PORT, timeout=5.0):
    """Ask the exporter at ``address`` to stop exporting ``busid`` to this host (OP_REQ_RELEASE): it drops the export
    from its table and gives the device back to its driver. True when it did, False when it exported nothing of the
    kind to this host; UsbipError when it cannot be reached."""
    sock = _connect(address, port, timeout)

    def work():
        sock.sendall(pack_op_common(OP_REQ_RELEASE) + BUSID.pack(busid.encode()))
        return _receive_op_common(sock, OP_REP_RELEASE)["status"] == ST_OK

    try:
        return _talk(address, port, "giving back %s" % busid, work)
    finally:
        sock.close()


# The exporter (host A)


def log(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Exporter:
    """The exports of this host: bound to usbip-host while present, offered to their importer only."""

    def __init__(self, path=None, root=SYS_USB, out=log, state=EXPORTED_PATH):
        self.path = exports_path(path)
        self.root = root
        self.log = out
        self.state = state
        self.table = {"listen": None, "port": USBIP_PORT, "exports": []}
        self.mtime = None
        self.bound = self.load_state()  # busid -> export
        self.missing = set()
        self.server = None
        self.listening = None
        self.selector = selectors.DefaultSelector()
        self.reload_wanted = True

    # The table

    def reload_if_changed(self):
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self.mtime and not self.reload_wanted:
            return False
        self.reload_wanted = False
        self.mtime = mtime
        try:
            table = read_exports(self.path)
        except UsbipError as error:
            self.log("%s; keeping the exports as they were" % error)
            return False
        if table != self.table:
            self.log("loaded %d export(s) from %s" % (len(table["exports"]), self.path))
        self.table = table
        self.apply()
        return True

    def resolve(self):
        """``{busid: export}`` of the exports whose device is present."""
        present = {}
        devices = self.devices()
        for export in self.table["exports"]:
            busid = self.find(export, devices)
            key = export.get("id") or _describe(export.get("selector") or {})
            if busid is None:
                if key not in self.missing:
                    self.log("export of %s to %s: not plugged in here; waiting for it" % (key, export.get("importer")))
                    self.missing.add(key)
                continue
            self.missing.discard(key)
            present[busid] = export
        return present

    def devices(self):
        found = []
        for busid in _listdir(os.path.join(self.root, "devices")):
            if ":" in busid or busid.startswith("usb"):
                continue
            device = sysfs_device(busid, self.root)
            # A device this host imported itself is never offered on.
            if device is not None and "/vhci_hcd." not in device["path"]:
                found.append(device)
        return found

    @staticmethod
    def find(export, devices):
        selector = dict(export.get("selector") or {})
        if export.get("id"):
            selector = {"id": export["id"]}
        matches = [device for device in devices if offered_matches(selector, device) and _local_matches(selector, device)]
        if len(matches) == 1:
            return matches[0]["busid"]
        return None

    def apply(self):
        """Bind every present export to usbip-host; give back what is no longer exported."""
        wanted = self.resolve()
        for busid in sorted(set(self.bound) - set(wanted)):
            export = self.bound.pop(busid)
            try:
                if unbind(busid, self.root):
                    self.log("gave %s (%s) back to its driver: no longer exported" % (busid, export.get("id")))
            except UsbipError as error:
                self.log("cannot give %s back: %s" % (busid, error))
        for busid, export in sorted(wanted.items()):
            try:
                if bind(busid, self.root):
                    self.log(
                        "bound %s (%s) to usbip-host for %s (%s), domain %s"
                        % (busid, export.get("id"), export.get("importer"), export.get("importer_address"), export.get("domain"))
                    )
                self.bound[busid] = export
            except UsbipError as error:
                self.log("cannot export %s (%s): %s" % (busid, export.get("id"), error))
        self.save_state()

    def load_state(self):
        try:
            with open(self.state) as handle:
                return dict((busid, {"id": busid}) for busid in json.load(handle))
        except (OSError, ValueError, TypeError):
            return {}

    def save_state(self):
        try:
            os.makedirs(os.path.dirname(self.state), exist_ok=True)
            with open(self.state + ".tmp", "w") as handle:
                json.dump(sorted(self.bound), handle)
            os.rename(self.state + ".tmp", self.state)
        except OSError as error:
            self.log("cannot record the bound devices in %s: %s" % (self.state, error))

    def for_peer(self, address):
        """``{busid: export}`` of the bound exports declared for this peer address."""
        return dict((busid, export) for busid, export in self.bound.items() if export.get("importer_address") == address)

    def peers(self):
        return set(export.get("importer_address") for export in self.table["exports"])

    # The server

    def listen(self):
        address, port = self.table.get("listen"), port_of(self.table.get("port"))
        if self.listening == (address, port):
            return
        if self.server is not None:
            self.selector.unregister(self.server)
            self.server.close()
            self.server = None
            self.listening = None
        if not address:
            return
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind((address, port))
            server.listen(16)
        except OSError as error:
            server.close()
            raise UsbipError("cannot listen on %s:%d: %s" % (address, port, error.strerror or error))
        self.server = server
        self.listening = (address, port)
        self.selector.register(server, selectors.EVENT_READ, self.accept)
        self.log("listening on %s:%d" % (address, port))

    def accept(self):
        try:
            conn, peer = self.server.accept()
        except OSError:
            return
        try:
            self.serve(conn, peer[0])
        finally:
            conn.close()

    def serve(self, conn, peer):
        if peer not in self.peers():
            self.log("refused connection from %s: no export is declared for it" % peer)
            return
        conn.settimeout(5.0)
        try:
            request = unpack_op_common(_receive(conn, OP_COMMON.size))
            if request["code"] == OP_REQ_DEVLIST:
                offered = [sysfs_device(busid, self.root) for busid in sorted(self.for_peer(peer))]
                conn.sendall(pack_devlist_reply([device for device in offered if device is not None]))
            elif request["code"] == OP_REQ_IMPORT:
                busid = _c_string(_receive(conn, BUSID.size))
                self.export(conn, peer, busid)
            elif request["code"] == OP_REQ_RELEASE:
                busid = _c_string(_receive(conn, BUSID.size))
                conn.sendall(pack_op_common(OP_REP_RELEASE, ST_OK if self.give_back(peer, busid) else ST_NODEV))
            else:
                self.log("closed connection from %s: unknown request 0x%04x" % (peer, request["code"]))
        except (EOFError, OSError, struct.error) as error:
            self.log("connection from %s failed: %s" % (peer, error))

    def export(self, conn, peer, busid):
        export = self.for_peer(peer).get(busid)
        device = sysfs_device(busid, self.root) if export else None
        if export is None or device is None:
            self.log("refused the import of %s by %s: not exported to it" % (busid, peer))
            conn.sendall(pack_op_common(OP_REP_IMPORT, ST_NODEV))
            return
        status = stub_status(busid, self.root)
        if status != SDEV_ST_AVAILABLE:
            self.log(
                "refused the import of %s by %s: %s" % (busid, peer, "in use by an earlier import" if status == SDEV_ST_USED else "usbip status %d" % status)
            )
            conn.sendall(pack_op_common(OP_REP_IMPORT, ST_DEV_BUSY if status == SDEV_ST_USED else ST_NA))
            return
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            _write(os.path.join(self.root, "devices", busid, "usbip_sockfd"), "%d\n" % conn.fileno())
        except UsbipError as error:
            self.log("cannot export %s to %s: %s" % (busid, peer, error))
            conn.sendall(pack_op_common(OP_REP_IMPORT, ST_NA))
            return
        self.log("exported %s (%s) to %s (%s), domain %s" % (busid, export.get("id"), export.get("importer"), peer, export.get("domain")))
        conn.sendall(pack_op_common(OP_REP_IMPORT) + pack_usb_device(device))

    def give_back(self, peer, busid):
        """The importer at ``peer`` took the device back: drop its export from the table, give the device back to
        its driver. False when nothing of the kind is exported to that peer."""
        export = self.for_peer(peer).get(busid)
        if export is None:
            self.log("%s gave back %s, which is not exported to it" % (peer, busid))
            return False
        table = dict(self.table, exports=[item for item in self.table["exports"] if not self._same_export(item, export)])
        try:
            write_exports(table, self.path)
        except OSError as error:
            self.log("cannot drop the export of %s from %s: %s" % (busid, self.path, error))
            return False
        self.log("%s (%s) given back by %s (%s), domain %s: export removed" % (busid, export.get("id"), export.get("importer"), peer, export.get("domain")))
        self.reload_wanted = True
        self.reload_if_changed()
        return True

    @staticmethod
    def _same_export(item, export):
        fields = ("id", "selector", "importer", "importer_address", "domain")
        return all(item.get(field) == export.get(field) for field in fields)

    # udev and the loop

    def on_udev(self, monitor):
        changed = False
        while True:
            event = monitor.poll(timeout=0)
            if event is None:
                break
            if event.action in ("add", "remove", "bind", "unbind"):
                changed = True
        if changed:
            self.apply()

    def run(self):
        signal.signal(signal.SIGHUP, self.on_hup)
        monitor = None
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by(subsystem="usb", device_type="usb_device")
            monitor.start()
            self.selector.register(monitor, selectors.EVENT_READ, lambda: self.on_udev(monitor))
        except ImportError:
            self.log("pyudev is missing: replugs are caught by the periodic check only")
        self.log("exporting USB devices over USB/IP, table %s" % self.path)
        last_check = 0.0
        down = None
        while True:
            now = time.monotonic()
            if now - last_check >= 1.0:
                last_check = now
                reloaded = self.reload_if_changed()
                try:
                    self.listen()
                    if down is not None:
                        self.log("listening again after %.1f s" % (now - down))
                    down = None
                except UsbipError as error:
                    if down is None:
                        self.log("%s; retrying every 2 s" % error)
                        down = now
                if not reloaded and monitor is None:
                    self.apply()
            for key, _events in self.selector.select(timeout=1.0):
                key.data()

    def on_hup(self, _signum, _frame):
        self.reload_wanted = True


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvmhost-usb-exporter", description=__doc__.split("\n\n", maxsplit=1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="export the devices of the exports table over USB/IP")
    serve.add_argument("--exports", default=None, help="exports table (default: %s)" % EXPORTS_PATH)
    remote = commands.add_parser("list", help="list the devices an exporter offers this host")
    remote.add_argument("address")
    remote.add_argument("--port", type=int, default=USBIP_PORT)
    commands.add_parser("imports", help="list this host's imports")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            Exporter(args.exports).run()
        elif args.command == "list":
            for device in remote_devices(args.address, args.port):
                sys.stdout.write(
                    "%s %s:%s speed %d devid 0x%08x" % (device["busid"], device["vendor_id"], device["product_id"], device["speed"], device["devid"]) + "\n"
                )
        else:
            for record in imports():
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    except UsbipError as error:
        sys.stderr.write("%s\n" % error)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
