# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The consuming host's side of a selector with ``host``: the device is plugged into another KVM host of the
inventory, imported here over USB/IP (``_usbip``), and from then on a local USB device like any other.

usb_attach, usb_detach and usb_passthrough import such devices before they plan (the planner then chooses the
imported local device for the selector), and release an import no domain's intent claims any more. Check mode
imports nothing: a device not imported yet is planned as a stand-in, and the import is reported as an action.
"""

from __future__ import annotations

import os

from ansible_collections.kvmhost.usb.plugins.module_utils import _usb, _usbip

# Tests keep the import records in a directory of their own; operators have no reason to.
IMPORTS_DIR_ENV = "KVMHOST_USB_IMPORTS"


def imports_dir() -> str | None:
    return os.environ.get(IMPORTS_DIR_ENV) or None


def standing_imports() -> list[dict]:
    """This host's imports; none when USB/IP was never used here (vhci-hcd not loaded)."""
    try:
        return _usbip.imports(directory=imports_dir())
    except (OSError, _usbip.UsbipError):
        return []


def exported_to(devices: list[dict]) -> dict:
    """``{device id: {host, domain, address}}`` for the devices of this host the exports table exports."""
    found = {}
    for export in _usbip.read_exports().get("exports") or []:
        try:
            device = _usb.select_device(devices, _usb.normalize_selector(export.get("selector") or {}))
        except _usb.SelectorError:
            continue  # not plugged in: nothing to show
        found[device["id"]] = {"host": export.get("importer"), "domain": export.get("domain"), "address": export.get("importer_address")}
    return found


def imported_from(devices: list[dict]) -> dict:
    """``{device id: {host, link_address, busid}}`` for the devices this host imported."""
    found = {}
    for record in standing_imports():
        for device in devices:
            if record.get("local_port") and device["port"] == record["local_port"]:
                found[device["id"]] = {"host": record.get("host"), "link_address": record.get("link_address"), "busid": record.get("busid")}
    return found


def selector_key(selector: dict) -> tuple:
    return tuple(sorted(_usb.recorded_selector(selector).items()))


def require_link_address(selector: dict) -> None:
    if not selector.get("link_address"):
        raise _usb.SelectorError(
            "Selector (%s) names host %s but no link_address. The modules get it from the inventory through their action"
            " plugin (usb_link_address or ansible_host of %s); ad hoc, give link_address too."
            % (_usb.describe_selector(selector), selector["host"], selector["host"])
        )


def describe(selector: dict) -> str:
    """``46f4:0001:KING0001 from kvm1 (10.77.0.1)``: a remote device as actions and errors name it (with the port when
    the exporter is not on 3240)."""
    where = selector.get("link_address") or "no link address"
    if _usbip.port_of(selector.get("link_port")) != _usbip.USBIP_PORT:
        where = "%s:%s" % (where, selector["link_port"])
    return "%s from %s (%s)" % (_usb.describe_selector(_usb.device_fields(selector)), selector["host"], where)


def matching_import(records: list[dict], selector: dict) -> dict | None:
    """The standing import of this host that the selector chose earlier: same host, and the device fields the
    import record knows (its id) agree with the selector's."""
    for record in records:
        if record.get("host") != selector["host"]:
            continue
        device_id = record.get("id") or ""
        if "id" in selector:
            if device_id == selector["id"]:
                return record
            continue
        vendor_product = "%s:%s" % (selector.get("vendor_id", device_id[0:4]), selector.get("product_id", device_id[5:9]))
        if device_id[0:9] != vendor_product:
            continue
        if selector.get("serial") and device_id[10:] != _usb.encode_serial(selector["serial"]):
            continue
        return record
    return None


def stand_in(selector: dict) -> dict:
    """What check mode plans with for a device it has not imported: known only by the selector's fields."""
    fields = _usb.device_fields(selector)
    device_id = fields.get("id") or "%s:%s" % (fields.get("vendor_id", "????"), fields.get("product_id", "????"))
    return {
        "id": device_id,
        "vendor_id": device_id[0:4],
        "product_id": device_id[5:9],
        "vendor_device_id": device_id[0:9],
        "absent": True,
        "remote": True,
    }


class Imports:
    """The imports one run needs: ``prepare`` imports every remote selector's device (check mode: finds the ones
    standing), ``record(selector)`` is then its import record or None; ``actions`` are the imports made (or that
    would be), ``released`` the imports released at the end."""

    def __init__(self, check_mode: bool) -> None:
        self.check_mode = check_mode
        self.records = {}
        self.actions = []
        self.released = []
        self.by_domain = {}
        self.made = []
        self.warnings = []

    def prepare(self, selectors: list[tuple[str | None, dict]]) -> None:
        """Import the device of each ``(domain name, selector)`` with ``host`` unless it is imported already.
        Fails naming the domain and host; the imports this call made are released again first."""
        remote = [(name, selector) for name, selector in selectors if _usb.is_remote(selector)]
        if not remote:
            return
        standing = standing_imports()
        for name, selector in remote:
            require_link_address(selector)
            key = selector_key(selector)
            if key in self.records:
                continue
            record = matching_import(standing, selector)
            if record is None and self.check_mode:
                self._act(name, "would import %s" % describe(selector))
            elif record is None:
                try:
                    _usbip.load_vhci()
                    record = _usbip.ensure_import(
                        selector["host"],
                        selector["link_address"],
                        _usb.device_fields(selector),
                        port=_usbip.port_of(selector.get("link_port")),
                        directory=imports_dir(),
                    )
                except _usbip.UsbipError as error:
                    self.undo()
                    where = "Domain %s: c" % name if name else "C"
                    raise _usb.SelectorError("%sannot import %s: %s" % (where, describe(selector), error))
                self.made.append(record)
                self._act(name, "imported %s at vhci port %s" % (describe(selector), record.get("vhci_port")))
            self.records[key] = record

    def _act(self, name: str | None, action: str) -> None:
        self.actions.append(action)
        if name:
            self.by_domain.setdefault(name, []).append(action)

    def find_standing(self, selectors: list[dict]) -> None:
        """Only look up the standing imports of the remote selectors (usb_detach imports nothing)."""
        remote = [selector for selector in selectors if _usb.is_remote(selector)]
        standing = standing_imports() if remote else []
        for selector in remote:
            record = matching_import(standing, selector)
            if record is not None:
                self.records[selector_key(selector)] = record

    def record(self, selector: dict) -> dict | None:
        return self.records.get(selector_key(selector))

    def undo(self) -> None:
        """Release the imports this run made, when the run fails after making them."""
        for record in self.made:
            _usbip.release_import(record["host"], record["link_address"], record["id"], directory=imports_dir())
        self.made = []

    def release(self, records: list[dict]) -> None:
        """Release imports no domain claims any more, and give each export back to its host: the exporting host stops
        exporting the device at once. An exporter out of reach is a warning; its host's next converge drops the export."""
        for record in records:
            what = "%s from %s (%s)" % (record.get("id"), record.get("host"), record.get("link_address"))
            if self.check_mode:
                self.released.append("would release the import of %s" % what)
                continue
            try:
                released = _usbip.release_import(record["host"], record["link_address"], record["id"], directory=imports_dir(), give_back=True)
            except _usbip.UsbipError as error:
                released = True
                self.warnings.append(
                    "Released the import of %s, but %s still exports it until its next converge: %s" % (what, record.get("host"), error)
                )
            if released:
                self.released.append("released the import of %s" % what)


def local_device(devices: list[dict], record: dict, selector: dict) -> dict:
    """The local USB device an import record stands for (at its local port, else by its id)."""
    for field, wanted in (("port", record.get("local_port")), ("id", record.get("id"))):
        found = [device for device in devices if wanted and device[field] == wanted]
        if len(found) == 1:
            return found[0]
    raise _usb.SelectorError(
        "%s is imported (vhci port %s) but is not a USB device of this host; see the journal of kvmhost-usb-agent"
        % (describe(selector), record.get("vhci_port"))
    )


def unclaimed(records: list[dict], devices: list[dict], claimed: list[dict]) -> list[dict]:
    """The import records whose local device no intent entry claims any more (dropped or detached everywhere)."""
    found = []
    for record in records:
        try:
            device = local_device(devices, record, {"host": record.get("host"), "link_address": record.get("link_address"), "id": record.get("id")})
        except _usb.SelectorError:
            device = None
        if not any(device is not None and item is device for item in claimed) and not any(
            item.get("absent") and item["id"] == record.get("id") for item in claimed
        ):
            found.append(record)
    return found
