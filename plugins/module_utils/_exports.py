# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""usb_export's work: a host's whole list of USB/IP exports checked against the host model and written to the
exports table the exporter (``_usbip``) serves.

An export is refused, and nothing is written, when its device is not plugged in here, when a local domain holds it
or records it in its intent, when the host's own declaration gives it to a local domain, and when two exports
name the same device (for two importers, or two domains).
"""

from __future__ import annotations

import json
import os

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _host, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import ExportError, HostError, PassthroughError, SelectorError, UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import table as exports_table


def _label(item):
    return "Export of (%s) for domain %s on %s" % (_declaration.describe_selector(item["selector"]), item["domain"], item["importer"])


def plan(model, exports, local_domains):
    """The exports table entries, each with its device, checked against the host model; ExportError naming the first
    export that must not be made."""
    try:
        declared = _declaration.normalize_declaration(_declaration.local_declaration(local_domains))
    except PassthroughError as error:
        raise ExportError("local_domains: %s" % error)
    declared_devices = []
    for name, settings in declared.items():
        for selector in settings["devices"]:
            matches = [device for device in model.candidates if _usb.selector_matches(selector, device)]
            if len(matches) == 1:
                declared_devices.append((name, matches[0]))
    chosen = []
    for item in exports:
        try:
            device = _usb.select_device(model.devices, item["selector"])
        except SelectorError as error:
            raise ExportError("%s: %s" % (_label(item), error))
        holders = model.claimants(device)
        if holders:
            held = ", ".join("%s (%s)" % (domain.name, ", ".join(scopes)) for domain, scopes in holders)
            raise ExportError("%s: %s is held by local domain %s on this host; detach it there first" % (_label(item), device["id"], held))
        for name, declared_device in declared_devices:
            if declared_device is device:
                raise ExportError("%s: %s is also declared for local domain %s on this host" % (_label(item), device["id"], name))
        for earlier, earlier_device in chosen:
            if earlier_device is device:
                raise ExportError(
                    "%s is declared for two domains: %s on %s and %s on %s"
                    % (device["id"], earlier["domain"], earlier["importer"], item["domain"], item["importer"])
                )
        chosen.append((item, device))
    return [
        dict(
            id=device["id"],
            busid=device["port"],
            selector=item["selector"],
            importer=item["importer"],
            importer_address=item["importer_address"],
            domain=item["domain"],
        )
        for item, device in chosen
    ]


def converge(conn, uri, exports, listen_address, port, local_domains, check_mode, path=None):
    """usb_export's result: the table written (unless check mode) when it differs; ExportError otherwise."""
    items = _declaration.normalize_exports(exports)
    try:
        model = _host.HostModel.read(conn, uri)
    except HostError as error:
        raise ExportError(str(error))
    entries = plan(model, items, local_domains)
    table = {
        "listen": listen_address,
        "port": port,
        "exports": sorted(
            (dict((key, entry[key]) for key in ("id", "selector", "importer", "importer_address", "domain")) for entry in entries),
            key=lambda entry: entry["id"],
        ),
    }
    path = exports_table.exports_path(path)
    try:
        before = exports_table.read_exports(path)
    except UsbipError:
        before = None
    # No table and nothing to export: nothing to write (the role runs this on every host, exporting or not).
    changed = before != table and (bool(entries) or os.path.exists(path))
    if changed and not check_mode:
        try:
            exports_table.write_exports(table, path)
        except OSError as error:
            raise ExportError("Cannot write the exports table %s: %s" % (path, error))
    return {
        "changed": changed,
        "path": path,
        "exports": entries,
        "diff": {
            "before": json.dumps(before, indent=2, sort_keys=True) + "\n" if before is not None else "",
            "after": json.dumps(table, indent=2, sort_keys=True) + "\n",
            "before_header": path,
            "after_header": path,
        },
    }
