# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The consuming host's side of a selector with ``host``: the device is plugged into another KVM host of the
inventory, imported here over USB/IP (``_usbip``), and from then on a local USB device like any other.

usb_attach, usb_detach and usb_passthrough import such devices before they plan (the planner then chooses the
imported local device for the selector), and release an import no domain's intent claims any more. Check mode
imports nothing: a device not imported yet is planned as a stand-in, and the import is reported as an action. The
reattach agent imports again what the domains' intent names, through the same ``Imports``: this file is the one place
that tracks which import is a selector's.
"""

from __future__ import annotations

import os

from typing import Any

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import SelectorError, UnavailableError, UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import importer, sysfs, table
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.wire import USBIP_PORT, port_of

# Tests keep the import records in a directory of their own; operators have no reason to.
IMPORTS_DIR_ENV = "KVMHOST_USB_IMPORTS"


def imports_dir() -> str | None:
    return os.environ.get(IMPORTS_DIR_ENV) or None


def standing_imports() -> list[dict]:
    """This host's imports; none when USB/IP was never used here (vhci-hcd not loaded)."""
    try:
        return importer.imports(directory=imports_dir())
    except (OSError, UsbipError):
        return []


def exported_to(devices: list[dict]) -> dict:
    """``{device id: {host, domain, address}}`` for the devices of this host the exports table exports."""
    found = {}
    for export in table.read_exports().get("exports") or []:
        try:
            device = _usb.select_device(devices, _declaration.normalize_selector(export.get("selector") or {}))
        except SelectorError:
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
    return tuple(sorted(_declaration.recorded_selector(selector).items()))


def require_link_address(selector: dict) -> None:
    if not selector.get("link_address"):
        raise SelectorError(
            "Selector (%s) names host %s but no link_address. The modules get it from the inventory through their action"
            " plugin (usb_link_address or ansible_host of %s); ad hoc, give link_address too."
            % (_declaration.describe_selector(selector), selector["host"], selector["host"])
        )


def describe(selector: dict) -> str:
    """``46f4:0001:KING0001 from kvm1 (10.77.0.1)``: a remote device as actions and errors name it (with the port when
    the exporter is not on 3240)."""
    where = selector.get("link_address") or "no link address"
    if port_of(selector.get("link_port")) != USBIP_PORT:
        where = "%s:%s" % (where, selector["link_port"])
    return "%s from %s (%s)" % (_declaration.describe_selector(_declaration.device_fields(selector)), selector["host"], where)


def stand_in(selector: dict) -> dict:
    """What check mode plans with for a device it has not imported: known only by the selector's fields."""
    fields = _declaration.device_fields(selector)
    device_id = fields.get("id") or "%s:%s" % (fields.get("vendor_id", "????"), fields.get("product_id", "????"))
    return {
        "id": device_id,
        "vendor_id": device_id[0:4],
        "product_id": device_id[5:9],
        "vendor_device_id": device_id[0:9],
        "absent": True,
        "remote": True,
    }


def release_record(record: dict, give_back: bool = False) -> bool:
    """Release the import of a record (``importer.release_import``); with ``give_back``, its exporter is told."""
    return importer.release_import(
        record["host"], record["link_address"], {"id": record["id"]}, port=port_of(record.get("port")), directory=imports_dir(), give_back=give_back
    )


def remote_selector(entry: dict) -> dict:
    """The selector of an intent entry of a device imported from another host, with where that host is reached."""
    selector = dict(entry.get("selector") or {"id": entry["id"]})
    selector.update((key, entry[key]) for key in _declaration.REMOTE_FIELDS if entry.get(key))
    return selector


def remote_entries(model: Any) -> list[tuple[Any, dict]]:
    """``[(domain, entry)]`` of the intent entries of devices another host exports to this one, one per device."""
    found = []
    for domain in model.domains:
        for config in domain.configs.values():
            for entry in config.intent:
                if entry.get("link_address") and all(entry["id"] != other["id"] for _domain, other in found):
                    found.append((domain, entry))
    return found


def source(item: dict) -> str:
    """``kvm1 (10.77.0.1)``: where an import record or an intent entry came from, as the agent's journal says it."""
    host = item.get("host")
    return "%s (%s)" % (host, item["link_address"]) if host else item["link_address"]


class Imports:
    """This host's imports of the devices that selectors with ``host`` mean, one record a selector (``record``), each
    found among the standing imports (``importer.find_import``), else made (``importer.ensure_import``).

    A module run uses one for its selectors: ``prepare`` imports what they need (check mode: finds what stands),
    ``actions`` are the imports made (or that would be), ``release`` and ``released`` the imports released at the end.
    The agent keeps one across its passes for the remote entries of the domains' intent (``keep``), so that a lost
    import and a failing one are each reported once, and ``away`` says which of them it may watch for."""

    def __init__(self, check_mode: bool = False, timeout: float = 30.0) -> None:
        self.check_mode = check_mode
        self.timeout = timeout
        self.records = {}
        self.actions = []
        self.released = []
        self.by_domain = {}
        self.made = []
        self.warnings = []
        self.failing = {}
        # The agent's imports refused, once per failure message as its lines say them (``keep``), for its events.
        self.refused = []
        # The agent's imports that fail because their exporter has the device away, each with the bus id it was at
        # there (``keep``): selector key -> {id, source, link_address, port, busid}.
        self.away = {}
        self.busids = {}  # selector key -> the bus id of its device on the exporting host, the last one known
        self.back = set()  # the keys whose exporter said the device is back (a watch's answer), until the next pass

    @property
    def pending(self) -> bool:
        """Whether an import of the agent's failed, so that its next pass should come sooner."""
        return bool(self.failing)

    def _import(self, selector: dict, device_selector: dict, busid: str | None = None) -> dict:
        return importer.ensure_import(
            selector.get("host"),
            selector["link_address"],
            device_selector,
            timeout=self.timeout,
            port=port_of(selector.get("link_port")),
            directory=imports_dir(),
            busid=busid,
        )

    def prepare(self, selectors: list[tuple[str | None, dict]]) -> None:
        """Import the device of each ``(domain name, selector)`` with ``host`` unless it is imported already.
        Fails naming the domain and host; the imports this call made are released again first."""
        remote = [(name, selector) for name, selector in selectors if _declaration.is_remote(selector)]
        if not remote:
            return
        standing = standing_imports()
        for name, selector in remote:
            require_link_address(selector)
            key = selector_key(selector)
            if key in self.records:
                continue
            record = importer.find_import(standing, selector)
            if record is None and self.check_mode:
                self._act(name, "would import %s" % describe(selector))
            elif record is None:
                try:
                    sysfs.load_vhci()
                    record = self._import(selector, _declaration.device_fields(selector))
                except UsbipError as error:
                    self.undo()
                    where = "Domain %s: c" % name if name else "C"
                    raise SelectorError("%sannot import %s: %s" % (where, describe(selector), error))
                self.made.append(record)
                self._act(name, "imported %s at vhci port %s" % (describe(selector), record.get("vhci_port")))
            self.records[key] = record

    def keep(self, model: Any) -> list[str]:
        """The agent's pass: import again the devices the domains' intent names from other hosts that this host no
        longer holds (the agent reads the host's devices after it). The lines to log."""
        lines = []
        standing = standing_imports()
        wanted = [(domain, entry, remote_selector(entry)) for domain, entry in remote_entries(model)]
        held, self.records = self.records, {}
        found = dict((selector_key(selector), importer.find_import(standing, selector)) for _domain, _entry, selector in wanted)
        for domain, entry, selector in wanted:
            key = selector_key(selector)
            if found[key] is None and held.get(key) is not None:
                lines.append("lost %s imported from %s (vhci port %d); importing it again" % (entry["id"], source(held[key]), held[key]["vhci_port"]))
        for domain, entry, selector in wanted:
            key = selector_key(selector)
            record = found[key]
            if record is None and self.check_mode:
                lines.append("would import %s from %s for %s" % (entry["id"], source(entry), domain.name))
                continue
            if record is None:
                try:
                    # A device its exporter just said is back is asked for where it was (no device list first).
                    busid = self.busids.get(key) if key in self.back else None
                    record = self._import(selector, dict(entry.get("selector") or {}) or {"id": entry["id"]}, busid)
                except UsbipError as error:
                    message = "cannot import %s from %s for %s: %s; retrying" % (entry["id"], source(entry), domain.name, error)
                    if self.failing.get(key) != message:
                        lines.append(message)
                        self.refused.append({"peer": selector["link_address"], "reason": str(error), "domain": domain.name, "id": entry["id"]})
                    self.failing[key] = message
                    self._note_away(key, entry, selector, error)
                    continue
                self.failing.pop(key, None)
                where = "vhci port %d, local port %s" % (record["vhci_port"], record.get("local_port"))
                lines.append("imported %s from %s for %s (%s)" % (entry["id"], source(entry), domain.name, where))
            self.away.pop(key, None)
            self.busids[key] = record["busid"]
            self.records[key] = record
        for kept in (self.failing, self.away, self.busids):
            for key in [key for key in kept if key not in found]:
                del kept[key]
        self.back.clear()
        return lines

    def _note_away(self, key: tuple, entry: dict, selector: dict, error: UsbipError) -> None:
        """Note in ``away`` an import that failed because its exporter has the device away, when the bus id it was at
        there is known (from the exporter's refusal, else from the import it replaces); forget it otherwise."""
        if isinstance(error, UnavailableError) and error.busid:
            self.busids[key] = error.busid
        busid = self.busids.get(key)
        if not isinstance(error, UnavailableError) or busid is None:
            self.away.pop(key, None)
            return
        self.away[key] = {
            "id": entry["id"],
            "source": source(entry),
            "link_address": selector["link_address"],
            "port": port_of(selector.get("link_port")),
            "busid": busid,
        }

    def _act(self, name: str | None, action: str) -> None:
        self.actions.append(action)
        if name:
            self.by_domain.setdefault(name, []).append(action)

    def find_standing(self, selectors: list[dict]) -> None:
        """Only look up the standing imports of the remote selectors (usb_detach imports nothing)."""
        remote = [selector for selector in selectors if _declaration.is_remote(selector)]
        standing = standing_imports() if remote else []
        for selector in remote:
            record = importer.find_import(standing, selector)
            if record is not None:
                self.records[selector_key(selector)] = record

    def record(self, selector: dict) -> dict | None:
        return self.records.get(selector_key(selector))

    def undo(self) -> None:
        """Release the imports this run made, when the run fails after making them."""
        for record in self.made:
            release_record(record)
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
                released = release_record(record, give_back=True)
            except UsbipError as error:
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
    raise SelectorError(
        "%s is imported (vhci port %s) but is not a USB device of this host; see the journal of kvmhost-usb-agent"
        % (describe(selector), record.get("vhci_port"))
    )


def unclaimed(records: list[dict], devices: list[dict], claimed: list[dict]) -> list[dict]:
    """The import records whose local device no intent entry claims any more (dropped or detached everywhere)."""
    found = []
    for record in records:
        try:
            device = local_device(devices, record, {"host": record.get("host"), "link_address": record.get("link_address"), "id": record.get("id")})
        except SelectorError:
            device = None
        if not any(device is not None and item is device for item in claimed) and not any(
            item.get("absent") and item["id"] == record.get("id") for item in claimed
        ):
            found.append(record)
    return found
