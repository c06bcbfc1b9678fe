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

from ansible_collections.kvmhost.usb.plugins.module_utils import _passthrough, _usb, _usbip

EXPORT_FIELDS = ("importer", "importer_address", "domain")
# Fields of a selector that mean the device is on another host: not a local device of this one.
REMOTE_FIELDS = ("host", "link_address")


class ExportError(_passthrough.PassthroughError):
    """An export that must not be made; nothing was changed."""


def _label(item):
    return "Export of (%s) for domain %s on %s" % (_usb.describe_selector(item["selector"]), item["domain"], item["importer"])


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
        unknown = sorted(set(item) - set(EXPORT_FIELDS) - set(_usb.SELECTOR_FIELDS))
        if unknown:
            raise ExportError("exports[%d]: unknown field(s) %s; accepted: %s" % (index, ", ".join(unknown), ", ".join(_usb.SELECTOR_FIELDS + EXPORT_FIELDS)))
        selector = dict((field, item[field]) for field in _usb.SELECTOR_FIELDS if field in item)
        try:
            selector = _usb.normalize_selector(selector)
        except _usb.SelectorError as error:
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
            settings["devices"] = [item for item in devices if not (isinstance(item, dict) and any(item.get(field) for field in REMOTE_FIELDS))]
        local[name] = settings
    return local


def plan(planner, exports, local_domains):
    """The exports table entries, each with its device; ExportError naming the first export that must not be made."""
    model = planner.model
    try:
        declared = _passthrough.normalize_declaration(local_declaration(local_domains))
    except _passthrough.PassthroughError as error:
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
        except _usb.SelectorError as error:
            raise ExportError("%s: %s" % (_label(item), error))
        holders = model.holders(device)
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
    items = normalize_exports(exports)
    planner = _passthrough.Planner(conn, uri, check_mode)
    planner.enumerate()
    planner.load_domains()
    entries = plan(planner, items, local_domains)
    table = {
        "listen": listen_address,
        "port": port,
        "exports": sorted(
            (dict((key, entry[key]) for key in ("id", "selector", "importer", "importer_address", "domain")) for entry in entries),
            key=lambda entry: entry["id"],
        ),
    }
    path = _usbip.exports_path(path)
    try:
        before = _usbip.read_exports(path)
    except _usbip.UsbipError:
        before = None
    changed = before != table
    if changed and not check_mode:
        try:
            _usbip.write_exports(table, path)
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
