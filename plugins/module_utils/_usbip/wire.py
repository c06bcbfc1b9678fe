# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The USB/IP wire protocol (the Linux kernel's Documentation/usb/usbip_protocol.rst): its messages packed and
unpacked, and the requests an importer makes of an exporter over one TCP connection."""

from __future__ import annotations

import socket
import struct

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import RequestError, UnavailableError, UsbipError

USBIP_PORT = 3240
USBIP_VERSION = 0x0111

OP_REQ_DEVLIST = 0x8005
OP_REP_DEVLIST = 0x0005
OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT = 0x0003
# kvmhost.usb's own request, not in the USB/IP protocol: the importer gives an export back when its host takes the
# device back (usb_detach), so that the exporting host stops exporting it without another run there.
OP_REQ_RELEASE = 0x8F01
OP_REP_RELEASE = 0x0F01
# kvmhost.usb's own request too: the importer that lost an export (the device replugged over there, the connection
# broken) asks to be told the moment it is back, bound to usbip-host and free for an import, so that it imports again at
# once instead of polling. The exporter holds the connection until then, or answers "not yet" (ST_NA) after a while.
OP_REQ_WATCH = 0x8F02
OP_REP_WATCH = 0x0F02

# The status of a reply (usbip_common.h).
ST_OK = 0
ST_NA = 1
ST_DEV_BUSY = 2
ST_DEV_ERR = 3
ST_NODEV = 4
ST_ERROR = 5
STATUS_TEXT = {ST_NA: "not available", ST_DEV_BUSY: "busy", ST_DEV_ERR: "device error", ST_NODEV: "no such device", ST_ERROR: "error"}

# enum usb_device_speed, the speed of usbip_usb_device.
USB_SPEED_LOW = 1
USB_SPEED_FULL = 2
USB_SPEED_HIGH = 3
USB_SPEED_WIRELESS = 4
USB_SPEED_SUPER = 5
USB_SPEED_SUPER_PLUS = 6

OP_COMMON = struct.Struct(">HHI")
# struct usbip_usb_device: path[256] busid[32] busnum devnum speed (u32) idVendor idProduct bcdDevice (u16)
# bDeviceClass bDeviceSubClass bDeviceProtocol bConfigurationValue bNumConfigurations bNumInterfaces (u8).
USB_DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
# struct usbip_usb_interface: bInterfaceClass bInterfaceSubClass bInterfaceProtocol padding.
USB_INTERFACE = struct.Struct(">BBBB")
BUSID = struct.Struct(">32s")
COUNT = struct.Struct(">I")

# The requests an exporter answers, each with its whole length: the header, then the bus id of an import, a release or
# a watch.
REQUEST_SIZES = {
    OP_REQ_DEVLIST: OP_COMMON.size,
    OP_REQ_IMPORT: OP_COMMON.size + BUSID.size,
    OP_REQ_RELEASE: OP_COMMON.size + BUSID.size,
    OP_REQ_WATCH: OP_COMMON.size + BUSID.size,
}


def port_of(value):
    """The USB/IP port a table, record, selector or intent entry names: 3240 when it names none."""
    return int(value or USBIP_PORT)


def devid(busnum, devnum):
    return (busnum << 16) | devnum


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
        "path": c_string(fields[0]),
        "busid": c_string(fields[1]),
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


def pack_release_request(busid):
    return pack_op_common(OP_REQ_RELEASE) + BUSID.pack(busid.encode())


def pack_watch_request(busid):
    return pack_op_common(OP_REQ_WATCH) + BUSID.pack(busid.encode())


def c_string(data):
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


# A request, read by the exporter from an untrusted peer


def request_code(header):
    """The code of the request whose OP_COMMON header this is (its length is ``REQUEST_SIZES[code]``); RequestError
    unless the version is ours, the code one of the requests above and the status 0, as the protocol has it."""
    request = unpack_op_common(header)
    if request["version"] != USBIP_VERSION:
        raise RequestError("unknown version", "USB/IP version 0x%04x, expected 0x%04x" % (request["version"], USBIP_VERSION))
    if request["code"] not in REQUEST_SIZES:
        raise RequestError("unknown request", "unknown request code 0x%04x" % request["code"])
    if request["status"] != ST_OK:
        raise RequestError("status in a request", "status %d in a request, where the protocol has 0" % request["status"])
    return request["code"]


def request_busid(field):
    """The bus id of an import or release request's 32-byte field: a port name of the kernel's syntax (``2-1``,
    ``1-1.4``), ASCII, ended by a NUL and padded with NULs only; RequestError for anything else."""
    name, end, padding = field.partition(b"\0")
    text = None
    if end and not padding.strip(b"\0"):
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            pass
    if text is None or not _declaration.PORT.fullmatch(text):
        raise RequestError("malformed bus id", "bus id %r is not a USB port name, NUL-terminated and NUL-padded" % field.rstrip(b"\0"))
    return text


def receive(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed the connection after %d of %d bytes" % (len(data), size))
        data += chunk
    return data


def receive_op_common(sock, expected):
    reply = unpack_op_common(receive(sock, OP_COMMON.size))
    if reply["version"] != USBIP_VERSION:
        raise UsbipError("USB/IP version 0x%04x in the reply, expected 0x%04x" % (reply["version"], USBIP_VERSION))
    if reply["code"] != expected:
        raise UsbipError("USB/IP reply code 0x%04x, expected 0x%04x" % (reply["code"], expected))
    return reply


# A device and a selector

# Fields of a selector an offered device (a device list carries no serial) or a local one can be told by.
OFFERED_FIELDS = ("vendor_id", "product_id", "port", "address")


def offered_matches(selector, device):
    """Whether a device of a device list can be the one a selector means (the list carries no serial: that is
    checked once the device is local)."""
    return _usb.fields_match(selector, offered_view(device), OFFERED_FIELDS)


def offered_view(device):
    """A device as usbip_usb_device describes it, in the selector's terms: its busid is its port on its host."""
    return {
        "vendor_id": device["vendor_id"],
        "product_id": device["product_id"],
        "port": device["busid"],
        "address": "%03d:%03d" % (device["busnum"], device["devnum"]),
        "serial": device.get("serial"),
    }


def serial_matches(selector, device):
    return _usb.fields_match(selector, device, ("serial",))


# The importer's requests


def connect(address, port, timeout):
    try:
        return socket.create_connection((address, port), timeout=timeout)
    except socket.timeout:
        raise UsbipError("Cannot reach %s:%d: no answer within %g s (host down, link down or a firewall)" % (address, port, timeout))
    except ConnectionRefusedError:
        raise UsbipError("Cannot reach %s:%d: connection refused (is kvmhost-usb-exporter running there?)" % (address, port))
    except OSError as error:
        raise UsbipError("Cannot reach %s:%d: %s" % (address, port, error.strerror or error))


def talk(address, port, what, work):
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
    sock = connect(address, port, timeout)

    def work():
        sock.sendall(pack_op_common(OP_REQ_DEVLIST))
        reply = receive_op_common(sock, OP_REP_DEVLIST)
        if reply["status"] != ST_OK:
            raise UsbipError("%s:%d refused the device list: %s" % (address, port, STATUS_TEXT.get(reply["status"], reply["status"])))
        devices = []
        for _index in range(COUNT.unpack(receive(sock, COUNT.size))[0]):
            device = unpack_usb_device(receive(sock, USB_DEVICE.size))
            device["interfaces"] = [USB_INTERFACE.unpack(receive(sock, USB_INTERFACE.size))[0:3] for _i in range(device["num_interfaces"])]
            devices.append(device)
        return devices

    try:
        return talk(address, port, "the device list", work)
    finally:
        sock.close()


def request_import(sock, address, port, busid):
    """OP_REQ_IMPORT of ``busid`` on a connected socket: the device the exporter hands over on it."""

    def work():
        sock.sendall(pack_import_request(busid))
        reply = receive_op_common(sock, OP_REP_IMPORT)
        if reply["status"] != ST_OK:
            status = STATUS_TEXT.get(reply["status"], reply["status"])
            raise UnavailableError("%s:%d refused to export %s to this host: %s" % (address, port, busid, status), busid)
        return unpack_usb_device(receive(sock, USB_DEVICE.size))

    device = talk(address, port, "the import of %s" % busid, work)
    if device["busid"] != busid:
        raise UsbipError("%s:%d answered the import of %s with device %s" % (address, port, busid, device["busid"]))
    return device


def give_back_export(address, busid, port=USBIP_PORT, timeout=5.0):
    """Ask the exporter at ``address`` to stop exporting ``busid`` to this host (OP_REQ_RELEASE): it drops the export
    from its table and gives the device back to its driver. True when it did, False when it exported nothing of the
    kind to this host; UsbipError when it cannot be reached."""
    sock = connect(address, port, timeout)

    def work():
        sock.sendall(pack_release_request(busid))
        return receive_op_common(sock, OP_REP_RELEASE)["status"] == ST_OK

    try:
        return talk(address, port, "giving back %s" % busid, work)
    finally:
        sock.close()


def open_watch(address, busid, port=USBIP_PORT, timeout=5.0):
    """Ask the exporter at ``address`` to say when the export this host lost at ``busid`` is back (OP_REQ_WATCH): the
    connection, its request sent. The exporter answers when the export's device is bound to usbip-host again and free
    for an import (at once if it is), or "not yet" after holding the watch a while; ``watch_answer`` reads the answer
    once the connection is readable."""
    sock = connect(address, port, timeout)
    try:
        talk(address, port, "the watch of %s" % busid, lambda: sock.sendall(pack_watch_request(busid)))
    except UsbipError:
        sock.close()
        raise
    return sock


def watch_answer(sock, address, busid, port=USBIP_PORT):
    """The exporter's answer to a watch (``open_watch``): True when the export is back, False for "not yet". UsbipError
    when it refused the watch, or closed the connection unanswered, as an exporter of an older version does with a
    request it does not know."""
    try:
        reply = receive_op_common(sock, OP_REP_WATCH)
    except (EOFError, ConnectionResetError):
        raise UsbipError(
            "%s:%d closed the connection on the watch of %s without an answer (an exporter of an older version, stopped, or declaring no export"
            " for this host)" % (address, port, busid)
        )
    except socket.timeout:
        raise UsbipError("%s:%d did not finish its answer to the watch of %s in time" % (address, port, busid))
    except OSError as error:
        raise UsbipError("%s:%d: the watch of %s failed: %s" % (address, port, busid, error.strerror or error))
    if reply["status"] == ST_NA:
        return False
    if reply["status"] != ST_OK:
        raise UsbipError("%s:%d refused the watch of %s: %s" % (address, port, busid, STATUS_TEXT.get(reply["status"], reply["status"])))
    return True
