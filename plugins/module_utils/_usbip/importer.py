# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The importing host's side of USB/IP: a device of another host imported (OP_REQ_IMPORT, then its connection handed
to ``vhci-hcd`` as ``usbip attach`` does), from then on a local USB device of this host. Each import is recorded in
``/run/kvmhost-usb/imports/<vhci port>.json``; ``ensure_import`` and ``release_import`` are what the modules and the
agent call, and both tell an import of the device a selector means with one function, ``is_import_of``."""

from __future__ import annotations

import json
import os
import socket
import time

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import UnavailableError, UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import sysfs, wire
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.sysfs import SYS_USB, VHCI, VDEV_ST_NULL
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.wire import USBIP_PORT, port_of

IMPORTS_DIR = "/run/kvmhost-usb/imports"

# The records


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
    for name in sysfs.listdir(directory):
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
    ports = dict((item["port"], item) for item in sysfs.vhci_ports(vhci))
    found = []
    for vhci_port, record in sorted(_read_records(directory).items()):
        item = ports.get(vhci_port)
        # Between the attach and the device's enumeration the port is not yet "used"; only a free port is lost.
        if item is None or item["status"] == VDEV_ST_NULL:
            _forget_record(vhci_port, directory)
            continue
        found.append(dict(record, local_port=item["local_busid"]))
    return found


def same_source(record, selector):
    """Whether an import record came from the host a selector with ``host`` names: by its inventory name when both
    name one, else by the ``link_address`` and ``link_port`` it is reached at."""
    if selector.get("host") and record.get("host"):
        return record["host"] == selector["host"]
    if not selector.get("link_address"):
        return True
    return record["link_address"] == selector["link_address"] and port_of(record.get("port")) == port_of(selector.get("link_port"))


def is_import_of(record, selector, root=SYS_USB):
    """Whether an import record is the device a selector with ``host`` means: imported from that host
    (``same_source``), and the device the selector chooses there, by the id the record keeps, else by the local
    device."""
    if not same_source(record, selector):
        return False
    if selector.get("id") and record.get("id"):
        return record["id"] == selector["id"]
    local = sysfs.sysfs_device(record["local_port"], root) if record.get("local_port") else None
    if local is None:
        return False
    # A port or an address in the selector are the device's on the exporting host, where its busid is its port.
    remote = dict(local, busid=record["busid"])
    return wire.offered_matches(dict((key, value) for key, value in selector.items() if key != "address"), remote) and wire.serial_matches(selector, local)


def find_import(records, selector):
    """The import record of the device a selector with ``host`` means (``is_import_of``), None when there is none."""
    for record in records:
        if is_import_of(record, selector):
            return record
    return None


# Importing and releasing


def import_device(address, busid, port=USBIP_PORT, host=None, device_id=None, timeout=5.0, vhci=VHCI, directory=None):
    """Import ``busid`` from the exporter at ``address`` (OP_REQ_IMPORT) and attach it to a free vhci port,
    as ``usbip attach`` does; returns the vhci port. Records the import."""
    sysfs.vhci_ports(vhci)  # vhci-hcd is loaded, before anything is asked of the exporter
    sock = wire.connect(address, port, timeout)
    try:
        device = wire.request_import(sock, address, port, busid)
        # The kernel takes its own reference on the socket, blocking as usbip's; ours is closed below.
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        vhci_port = sysfs.free_port(sysfs.vhci_ports(vhci), device["speed"])
        sysfs.attach(vhci_port, sock, device, vhci)
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


def detach_import(vhci_port, vhci=VHCI, directory=None):
    """Detach a vhci port (the kernel closes the connection, the exporter's device becomes available again)."""
    sysfs.detach(vhci_port, vhci)
    _forget_record(vhci_port, directory)


def _where(host, address, port):
    return "%s (%s:%d)" % (host, address, port) if host else "%s:%d" % (address, port)


def _wait_local(vhci_port, deadline, vhci=VHCI, root=SYS_USB):
    """The local device behind a vhci port once the kernel enumerated it; None when the port went free."""
    while True:
        item = sysfs.vhci_port(vhci_port, vhci)
        if item is None or item["status"] == VDEV_ST_NULL:
            return None
        device = sysfs.sysfs_device(item["local_busid"], root) if item["local_busid"] else None
        if device is not None and device["vendor_id"]:
            return device
        if time.monotonic() > deadline:
            raise UsbipError("vhci port %d: the imported device did not appear within the timeout" % vhci_port)
        time.sleep(0.05)


def _source(host, link_address, port):
    source = {"link_address": link_address, "link_port": port}
    if host:
        source["host"] = host
    return source


def ensure_import(host, link_address, selector, timeout=30.0, port=USBIP_PORT, vhci=VHCI, directory=None, busid=None):
    """Import the device a selector means from ``host`` at ``link_address`` unless this host holds it already, and
    wait until it is a local USB device; the import record. UsbipError with a clear message otherwise, UnavailableError
    when the exporter answered but has the device away (not offered, or refused as in use or not available).

    ``busid``, where the exporter had the device last (the agent knows it), is asked for first, without the device
    list: a replug on the exporting host mostly brings the device back at its port. Anything else goes the long way."""
    where = _where(host, link_address, port)
    source = _source(host, link_address, port)
    standing = [record for record in imports(vhci, directory) if same_source(record, source)]
    record = find_import(standing, dict(selector, **source))
    if record is not None:
        return record
    deadline = time.monotonic() + timeout
    if busid is not None and busid not in set(record["busid"] for record in standing) and not selector.get("address"):
        try:
            record = _import_busid(host, link_address, selector, busid, port, deadline, vhci, directory)
        except UsbipError:
            record = None
        if record is not None:
            return record
    offered = wire.remote_devices(link_address, port, timeout=min(timeout, 5.0))
    held = set(record["busid"] for record in standing)
    candidates = [device for device in offered if wire.offered_matches(selector, device) and device["busid"] not in held]
    if not candidates:
        listed = ", ".join("%s %s:%s" % (device["busid"], device["vendor_id"], device["product_id"]) for device in offered) or "nothing"
        raise UnavailableError(
            "%s offers this host no device matching (%s): not plugged in there, or not exported to this host; it offers: %s"
            % (where, _declaration.describe_selector(selector) or "any device", listed)
        )
    for device in candidates:
        record = _import_busid(host, link_address, selector, device["busid"], port, deadline, vhci, directory)
        if record is not None:
            return record
    raise UsbipError(
        "%s exports %s, but none with serial %s" % (where, ", ".join(device["busid"] for device in candidates), _usb.wanted_fields(selector).get("serial"))
    )


def _import_busid(host, link_address, selector, busid, port, deadline, vhci=VHCI, directory=None):
    """Import ``busid`` and wait for its local device: the import record when it is the device ``selector`` means, else
    None (the import released again)."""
    vhci_port = import_device(
        link_address, busid, port, host=host, device_id=selector.get("id"), timeout=min(deadline - time.monotonic(), 5.0), vhci=vhci, directory=directory
    )
    local = _wait_local(vhci_port, deadline, vhci)
    if local is None:
        _forget_record(vhci_port, directory)
        raise UsbipError("%s: the import of %s ended at once (vhci port %d went free)" % (_where(host, link_address, port), busid, vhci_port))
    # The device as the exporter offers it, but with the vendor, product and serial its own descriptors gave here.
    offered = {"vendor_id": local["vendor_id"], "product_id": local["product_id"], "port": busid}
    if not (_usb.fields_match(selector, offered, ("vendor_id", "product_id", "port")) and wire.serial_matches(selector, local)):
        detach_import(vhci_port, vhci, directory)
        return None
    record = {
        "vhci_port": vhci_port,
        "host": host,
        "link_address": link_address,
        "port": port,
        "busid": busid,
        "id": selector.get("id") or _usb.id_of(local["vendor_id"], local["product_id"], local.get("serial"), local["busid"]),
        "vendor_id": local["vendor_id"],
        "product_id": local["product_id"],
    }
    _write_record(record, directory)
    return dict(record, local_port=local["busid"])


def release_import(host, link_address, selector, port=USBIP_PORT, vhci=VHCI, directory=None, give_back=False):
    """Detach this host's import of the device a selector means from ``host`` at ``link_address``; True when there was
    one. With ``give_back``, also ask the exporter to stop exporting it (``wire.give_back_export``)."""
    changed = False
    for record in imports(vhci, directory):
        if is_import_of(record, dict(selector, **_source(host, link_address, port))):
            detach_import(record["vhci_port"], vhci, directory)
            if give_back:
                wire.give_back_export(link_address, record["busid"], port_of(record.get("port")))
            changed = True
    return changed
