# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host model: one read of a KVM host and one set of answers about it.

A model holds the host's USB devices and every domain's live and persistent configuration (its USB
hostdevs and its passthrough intent). It answers, for everyone who asks (usb_facts, the planner of
usb_passthrough/usb_attach/usb_detach, the drift report and the reattach agent), in these words and no others:

* a hostdev **designates** the present devices its source names: by bus/device address when it is **pinned**
  (has one), else by vendor:product (``designates``);
* a hostdev **belongs** to a device: it designates that device alone, or, designating several or none (twins, a
  replug), the configuration's intent gives it to that device (``belongs``, ``hostdevs_of``); it **pins** the device
  when it designates that device alone, live by its address (``pins``);
* an intent entry **means** a present device, even after the id rule changed its id (``find``, ``meant``);
* a configuration **holds** a device when one of its hostdevs designates it and belongs to it (``holds``, ``held``;
  by domain and scope, ``held_by``), and **claims** it when it holds it or its intent means it (``claims``,
  ``claimed``); the domains that claim a device are its **claimants** (``claimants``);
* the status of each intent entry, which hostdevs are stale, which domains could not start as they
  are, and how the host differs from a declared state (``drift``).

What the modules return keeps its own names (``attached_to`` of a device, ``held_by`` and ``intended_for`` of the drift
report, the status ``attached`` of an entry).

It is built from a live host (``_usb.enumerate_devices`` and ``load_domains``) or from the facts usb_facts
returned (``from_facts``), so the report on the controller gives the same answers as the modules on the host.

Which device an intent entry means: the entry records the device id and the serial, the
port and the bus/device address the device had when the entry was recorded. A newcomer with the same
vendor:product and serial turns both ids port-based; a twin leaving turns a port-based id
serial-based. Among the present devices of the entry's vendor:product (and its serial, when known),
the one with the recorded id, else the one at the recorded address, else the one at the recorded port
is the device. When none of those tells, the device is missing: a twin is never handed over in its place.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from typing import Any

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _intent, _libvirt, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import HostError, SelectorError

LIVE = "live"
PERSISTENT = "persistent"
SCOPES = (LIVE, PERSISTENT)
DRIFT = ("missing", "unattached", "undeclared", "stale", "invalid", "unknown_domains", "unstartable")
SOURCES = {"intent": "recorded in its intent", "inventory": "declared in the inventory"}


@dataclass
class Config:
    hostdevs: list
    intent: list


@dataclass(eq=False)
class Domain:
    handle: Any
    name: str
    uuid: str
    state: str
    configs: dict
    before: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"name": self.name, "uuid": self.uuid, "state": self.state}

    @property
    def running(self) -> bool:
        return self.state in ("running", "paused")


def _read_config(xml_text: str) -> Config:
    return Config(hostdevs=_libvirt.usb_hostdevs(xml_text), intent=_intent.from_domain_xml(xml_text))


def load_domain(handle: Any) -> Domain:
    configs = {}
    if handle.isActive():
        configs[LIVE] = _read_config(_libvirt.domain_xml(handle))
    if handle.isPersistent():
        configs[PERSISTENT] = _read_config(_libvirt.domain_xml(handle, inactive=True))
    return Domain(
        handle=handle,
        name=handle.name(),
        uuid=handle.UUIDString(),
        state=_libvirt.domain_state_name(handle),
        configs=configs,
        before=copy.deepcopy(configs),
    )


def load_domains(conn: Any, uri: str) -> list[Domain]:
    libvirt = _libvirt.libvirt
    try:
        handles = conn.listAllDomains(0)
    except libvirt.libvirtError as error:
        raise HostError("Cannot list the domains at %s: %s" % (uri, _libvirt.error_message(error)))
    domains = []
    for handle in handles:
        try:
            domains.append(load_domain(handle))
        except libvirt.libvirtError as error:
            # A domain undefined while we read it is simply not there.
            if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HostError("Cannot read domain %s: %s" % (handle.name(), _libvirt.error_message(error)))
    return domains


def vendor_product(item: dict) -> str:
    return "%s:%s" % (item.get("vendor_id"), item.get("product_id"))


def pinned(hostdev: dict) -> bool:
    return hostdev.get("bus") is not None and hostdev.get("device") is not None


def absent_device(device_id: str) -> dict:
    """A stand-in for a device that is not plugged in, known only by its id."""
    return {"id": device_id, "vendor_id": device_id[0:4], "product_id": device_id[5:9], "vendor_device_id": device_id[0:9], "absent": True}


def entry_serial(entry: dict) -> str | None:
    """The serial an intent entry recorded, or the one its serial-based id carries."""
    return entry.get("serial") or _usb.id_fields(entry["id"]).get("serial")


def entry_port(entry: dict) -> str | None:
    """The port an intent entry recorded, or the one its port-based id carries."""
    return entry.get("port") or _usb.id_fields(entry["id"]).get("port")


def new_entry(device: dict, selector: dict) -> dict:
    """The intent entry for a device chosen by a selector: its id, and what finds it again."""
    entry = {"id": device["id"], "selector": _declaration.recorded_selector(selector)}
    entry.update((key, selector[key]) for key in _declaration.REMOTE_FIELDS if selector.get(key))
    if device.get("absent"):
        serial = entry_serial(entry)
        if serial:
            entry["serial"] = serial
        return entry
    for key in ("serial", "port", "address"):
        if device.get(key):
            entry[key] = device[key]
    return entry


class HostModel:
    def __init__(self, devices: list[dict], domains: list[Domain]) -> None:
        self.devices = devices
        self.candidates = _usb.passthrough_candidates(devices)
        self.domains = domains
        # Hostdevs designate devices by address or by vendor:product: both looked up, not searched.
        self.by_address = {}
        self.by_vendor_product = {}
        for device in self.candidates:
            self.by_address.setdefault((device["bus"], device["device"]), []).append(device)
            self.by_vendor_product.setdefault(device["vendor_device_id"], []).append(device)

    @classmethod
    def read(cls, conn: Any, uri: str, context: Any = None) -> HostModel:
        """One read of a live host: its USB devices and every domain; HostError when libvirt cannot list or read them."""
        return cls(_usb.enumerate_devices(context), load_domains(conn, uri))

    @classmethod
    def from_facts(cls, facts: dict) -> HostModel:
        """The model of a host from the ansible_facts usb_facts returned."""
        devices = [dict(device, is_root_hub=False) for device in facts.get("usb_devices") or [] if not device.get("is_hub")]
        domains = []
        for item in facts.get("usb_domains") or []:
            configs = {}
            for scope in SCOPES:
                config = item.get(scope)
                if config:
                    intent = [dict((key, value) for key, value in entry.items() if key != "status") for entry in config.get("intent") or []]
                    configs[scope] = Config(hostdevs=[dict(hostdev) for hostdev in config.get("hostdevs") or []], intent=intent)
            domains.append(Domain(handle=None, name=item["name"], uuid=item.get("uuid") or "", state=item.get("state") or "unknown", configs=configs))
        return cls(devices, domains)

    # Domains

    def domain(self, name_or_uuid: str) -> Domain | None:
        for domain in self.domains:
            if domain.name == name_or_uuid:
                return domain
        wanted = name_or_uuid.replace("-", "").lower()
        for domain in self.domains:
            if domain.uuid.replace("-", "").lower() == wanted:
                return domain
        return None

    def domain_names(self) -> str:
        return ", ".join(sorted(domain.name for domain in self.domains)) or "none"

    # Devices and hostdevs

    def designates(self, hostdev: dict) -> list[dict]:
        """The present devices a hostdev designates (by bus/device when pinned, else by vendor:product)."""
        if pinned(hostdev):
            found = self.by_address.get((hostdev["bus"], hostdev["device"]), [])
        else:
            found = self.by_vendor_product.get(vendor_product(hostdev), [])
        return [device for device in found if _libvirt.hostdev_matches(hostdev, device)]

    def find(self, entry: dict) -> dict | None:
        """The present device an intent entry means (see the module docstring), or None."""
        serial = entry_serial(entry)
        pool = [device for device in self.by_vendor_product.get(entry["id"][0:9], []) if serial is None or device["serial"] == serial]
        for key, value in (("id", entry["id"]), ("address", entry.get("address")), ("port", entry_port(entry))):
            if value:
                found = [device for device in pool if device[key] == value]
                if len(found) == 1:
                    return found[0]
        return None

    def meant(self, config: Config) -> list[tuple[dict, dict | None]]:
        """Each intent entry of the configuration and the present device it means (None when none)."""
        return [(entry, self.find(entry)) for entry in config.intent]

    def belongs(self, hostdev: dict, device: dict, config: Config) -> bool:
        """Whether a hostdev of a configuration belongs to a device.

        One that designates exactly that device does. One that designates several devices (vendor:product
        without address, twins present) or none (an address left by a replug) belongs to a device of its
        vendor:product that no other hostdev there designates alone and that the configuration's intent means,
        or, when the intent means none of that vendor:product, to any of them."""
        found = self.designates(hostdev)
        if found:
            if device not in found:
                return False
            if len(found) == 1:
                return True
        elif vendor_product(hostdev) != vendor_product(device):
            return False
        if any(other is not hostdev and self.designates(other) == [device] for other in config.hostdevs):
            # Another hostdev designates the device alone: this one belongs to another device, a twin's left by a replug.
            return False
        entries = [(entry, present) for entry, present in self.meant(config) if entry["id"][0:9] == device["vendor_device_id"]]
        if not entries:
            return True
        if device.get("absent"):
            return any(entry["id"] == device["id"] for entry, _present in entries)
        return any(present is device for _entry, present in entries)

    def pins(self, hostdev: dict, device: dict, scope: str) -> bool:
        """Whether the hostdev pins the device: it designates that device alone; live, only when pinned (a live
        hostdev without an address is what libvirt leaves of an optional device absent at start)."""
        if scope == LIVE and not pinned(hostdev):
            return False
        return self.designates(hostdev) == [device]

    def hostdevs_of(self, config: Config, device: dict) -> list[dict]:
        """The hostdevs of the configuration that belong to the device."""
        return [hostdev for hostdev in config.hostdevs if self.belongs(hostdev, device, config)]

    def holds(self, config: Config, device: dict) -> bool:
        """Whether the configuration holds the device: one of its hostdevs designates it and belongs to it."""
        return any(self.designates(hostdev) and self.belongs(hostdev, device, config) for hostdev in config.hostdevs)

    def held(self, config: Config) -> list[dict]:
        """The devices the configuration holds."""
        found = []
        for hostdev in config.hostdevs:
            for device in self.designates(hostdev):
                if device not in found and self.belongs(hostdev, device, config):
                    found.append(device)
        return found

    def claimed(self, config: Config) -> list[dict]:
        """The devices the configuration claims (holds, or its intent means); absent ones as stand-ins."""
        found = []
        for entry, device in self.meant(config):
            found.append(device if device is not None else absent_device(entry["id"]))
        return found + [device for device in self.held(config) if device not in found]

    def claims(self, config: Config, device: dict) -> bool:
        """Whether the configuration claims the device: holds it, or its intent means it."""
        if device.get("absent"):
            return any(entry["id"] == device["id"] and self.find(entry) is None for entry in config.intent)
        return any(present is device for _entry, present in self.meant(config)) or self.holds(config, device)

    def claimants(self, device: dict, exclude: Domain | None = None) -> list[tuple[Domain, list[str]]]:
        """``[(domain, [scopes])]`` of the device's claimants."""
        found = []
        for domain in self.domains:
            if domain is exclude:
                continue
            scopes = [scope for scope in SCOPES if scope in domain.configs and self.claims(domain.configs[scope], device)]
            if scopes:
                found.append((domain, scopes))
        return found

    def held_by(self, device: dict) -> dict:
        """``{scope: [domain names]}`` of the domains that hold the device."""
        return dict(
            (scope, sorted(domain.name for domain in self.domains if scope in domain.configs and self.holds(domain.configs[scope], device)))
            for scope in SCOPES
        )

    def entry_status(self, config: Config, scope: str, entry: dict) -> str:
        """``attached``: a hostdev of the configuration designates the device and belongs to it (live: by its address);
        ``missing``: the device is not plugged in (or cannot be told from a twin); ``stale``: it is, and no
        hostdev designates it, as after a replug the agent has not caught up with."""
        device = self.find(entry)
        if device is None:
            return "missing"
        for hostdev in config.hostdevs:
            if (pinned(hostdev) or scope == PERSISTENT) and device in self.designates(hostdev) and self.belongs(hostdev, device, config):
                return "attached"
        return "stale"

    def unstartable(self, domain: Domain) -> list[str]:
        """Why the persistent configuration could not start as it is: libvirt refuses a hostdev that
        designates several devices, and a mandatory one that designates none."""
        config = domain.configs.get(PERSISTENT)
        if config is None:
            return []
        reasons = []
        for hostdev in config.hostdevs:
            found = self.designates(hostdev)
            if len(found) > 1:
                reasons.append(
                    "hostdev %s designates %d devices (%s)" % (vendor_product(hostdev), len(found), ", ".join(device["id"] for device in found))
                )
            elif not found and hostdev.get("startup_policy") not in ("optional", "requisite"):
                where = "at %03d:%03d" % (hostdev["bus"], hostdev["device"]) if pinned(hostdev) else "by vendor:product"
                reasons.append("hostdev %s %s designates no present device and is not optional" % (vendor_product(hostdev), where))
        return reasons

    # Views

    def device_view(self, device: dict) -> dict:
        view = _usb.public_view(device)
        view["attached_to"] = self.held_by(device)
        return view

    def hostdev_view(self, hostdev: dict) -> dict:
        designated = [device["id"] for device in self.designates(hostdev)]
        return dict(
            vendor_id=hostdev["vendor_id"],
            product_id=hostdev["product_id"],
            bus=hostdev["bus"],
            device=hostdev["device"],
            address="%03d:%03d" % (hostdev["bus"], hostdev["device"]) if pinned(hostdev) else None,
            startup_policy=hostdev.get("startup_policy"),
            devices=designated,
            stale=pinned(hostdev) and not designated,
        )

    def domain_view(self, domain: Domain) -> dict:
        view = dict(name=domain.name, state=domain.state, live=None, persistent=None)
        for scope, config in domain.configs.items():
            intent = [dict(entry, status=self.entry_status(config, scope, entry)) for entry in config.intent]
            view[scope] = dict(hostdevs=[self.hostdev_view(hostdev) for hostdev in config.hostdevs], intent=intent)
        return view

    # How the host differs from a declared state

    def drift(self, declared: dict | None = None, topology: list | None = None, inventory: bool = True) -> dict:
        """What the host has and where it differs from ``declared`` (domain name to ``devices`` and
        ``exclusive``) and from the domains' own intent: what probe.yml and report.yml show. Without ``inventory``
        the report leaves out what the host has (``devices``, ``tree`` and the summary's ``present``), which
        usb_facts gives: only how it differs."""
        declared = declared or {}
        report = dict((key, []) for key in DRIFT)
        entries = {}
        for device in self.candidates:
            entries[device["id"]] = {
                "id": device["id"],
                "address": device.get("address"),
                "port": device.get("port"),
                "model": device.get("model"),
                "vendor_device_id": device.get("vendor_device_id"),
                "serial": device.get("serial"),
                "held_by": {LIVE: [], PERSISTENT: []},
                "intended_for": [],
                "declared_for": [],
                "flags": [],
            }

        for domain in sorted(self.domains, key=lambda item: item.name):
            for scope, config in domain.configs.items():
                for device in self.held(config):
                    entries[device["id"]]["held_by"][scope].append(domain.name)

        domains = []
        for domain in sorted(self.domains, key=lambda item: item.name):
            meant = []
            for scope in SCOPES:
                config = domain.configs.get(scope)
                if config is None:
                    continue
                for entry in config.intent:
                    if entry["id"] not in [known["id"] for known, _device in meant]:
                        meant.append((entry, self.find(entry)))
                for hostdev in config.hostdevs:
                    view = self.hostdev_view(hostdev)
                    if view["stale"]:
                        report["stale"].append({"domain": domain.name, "scope": scope, "address": view["address"], "vendor_device_id": vendor_product(hostdev)})
            for entry, device in meant:
                if device is None:
                    report["missing"].append({"domain": domain.name, "device": entry["id"], "source": "intent"})
                    continue
                item = entries[device["id"]]
                item["intended_for"].append(domain.name)
                if not _holds(item, domain.name):
                    report["unattached"].append({"domain": domain.name, "device": device["id"], "held_by": _holding(item)})
            for reason in self.unstartable(domain):
                report["unstartable"].append({"domain": domain.name, "reason": reason})
            settings = declared.get(domain.name) or {}
            domains.append(
                {
                    "name": domain.name,
                    "state": domain.state,
                    "declared": domain.name in declared,
                    "exclusive": bool(settings.get("exclusive")),
                    "holds": sorted(item["id"] for item in entries.values() if _holds(item, domain.name)),
                    "stale": sorted(set(item["address"] for item in report["stale"] if item["domain"] == domain.name)),
                }
            )

        for name, settings in sorted(declared.items()):
            domain = self.domain(name)
            if domain is None:
                report["unknown_domains"].append(name)
                domains.append({"name": name, "state": None, "declared": True, "exclusive": bool(settings.get("exclusive")), "holds": [], "stale": []})
            chosen = []
            for selector in settings.get("devices") or []:
                try:
                    normalized = _declaration.normalize_selector(selector)
                except SelectorError as error:
                    report["invalid"].append({"domain": name, "selector": _selector_text(selector), "error": str(error)})
                    continue
                matches = [device for device in self.candidates if _usb.selector_matches(normalized, device)]
                if len(matches) > 1:
                    held = [device for device in matches if domain and any(self.claims(config, device) for config in domain.configs.values())]
                    if len(held) != 1:
                        error = "ambiguous: %s match" % ", ".join(device["id"] for device in matches)
                        report["invalid"].append({"domain": name, "selector": _declaration.describe_selector(normalized), "error": error})
                        continue
                    matches = held
                if not matches:
                    recorded = domain and self.recorded(domain, normalized)
                    if recorded is None or recorded[1] is None:
                        if not recorded:
                            report["missing"].append({"domain": name, "device": _declaration.describe_selector(normalized), "source": "inventory"})
                        continue
                    matches = [recorded[1]]
                item = entries[matches[0]["id"]]
                chosen.append(item["id"])
                if name not in item["declared_for"]:
                    item["declared_for"].append(name)
                unattached = {"domain": name, "device": item["id"], "held_by": _holding(item)}
                if domain and not _holds(item, name) and unattached not in report["unattached"]:
                    report["unattached"].append(unattached)
            if settings.get("exclusive") and domain:
                holds = next(item["holds"] for item in domains if item["name"] == name)
                report["undeclared"].extend({"domain": name, "device": device_id} for device_id in holds if device_id not in chosen)

        for item in entries.values():
            claimants = set(_holding(item)) | set(item["intended_for"]) | set(item["declared_for"])
            if not claimants:
                item["flags"].append("unclaimed")
            elif len(claimants) > 1:
                item["flags"].append("conflict")

        report["devices"] = [entries[device["id"]] for device in self.candidates]
        report["tree"] = _annotate(copy.deepcopy(topology or []), entries)
        report["domains"] = sorted(domains, key=lambda item: item["name"])
        report["unclaimed"] = [item["id"] for item in report["devices"] if "unclaimed" in item["flags"]]
        report["drift"] = any(report[key] for key in DRIFT)
        report["summary"] = _summary(report)
        if not inventory:
            for key in ("devices", "tree"):
                del report[key]
            del report["summary"]["present"]
        return report

    def recorded(self, domain: Domain, selector: dict) -> tuple[dict, dict | None] | None:
        """The intent entry of the domain recorded for this selector (by id or by the same selector), and the device it means."""
        for config in domain.configs.values():
            for entry in config.intent:
                if entry["id"] == selector.get("id") or entry["selector"] == _declaration.recorded_selector(selector):
                    return entry, self.find(entry)
        return None


def _holding(item: dict) -> list[str]:
    return sorted(set(item["held_by"][LIVE] + item["held_by"][PERSISTENT]))


def _holds(item: dict, name: str) -> bool:
    return name in item["held_by"][LIVE] or name in item["held_by"][PERSISTENT]


def _selector_text(selector: Any) -> str:
    if isinstance(selector, dict):
        return _declaration.describe_selector(selector) or str(selector)
    return str(selector)


def _holding_text(held_by: dict) -> str:
    names = []
    for name in held_by[LIVE] + held_by[PERSISTENT]:
        if name not in names:
            names.append(name)
    return ", ".join("%s (%s)" % (name, ", ".join(scope for scope in SCOPES if name in held_by[scope])) for name in names)


def _summary(report: dict) -> dict:
    present = []
    for item in report["devices"]:
        line = "%s %s port %s %s" % (item["id"], item["address"], item["port"], item["model"] or "")
        holding = _holding_text(item["held_by"])
        if holding:
            line += ": held by " + holding
        if item["flags"]:
            line += " [%s]" % ", ".join(item["flags"])
        present.append(line)
    drift = ["%s: declares %s, held by %s" % (item["domain"], item["device"], ", ".join(item["held_by"]) or "nobody") for item in report["unattached"]]
    drift += ["%s (exclusive): holds %s, which it does not declare" % (item["domain"], item["device"]) for item in report["undeclared"]]
    drift += ["%s: selector (%s): %s" % (item["domain"], item["selector"], item["error"]) for item in report["invalid"]]
    drift += ["%s: declared, but the host has no such domain" % name for name in report["unknown_domains"]]
    drift += ["%s: could not start as it is: %s" % (item["domain"], item["reason"]) for item in report["unstartable"]]
    return {
        "present": present,
        "missing": ["%s: %s (%s), not plugged in" % (item["domain"], item["device"], SOURCES[item["source"]]) for item in report["missing"]],
        "unclaimed": list(report["unclaimed"]),
        "stale": [
            "%s (%s): hostdev %s at %s, where no such device is" % (item["domain"], item["scope"], item["vendor_device_id"], item["address"])
            for item in report["stale"]
        ],
        "drift": drift,
    }


def _annotate(nodes: list, entries: dict) -> list:
    for node in nodes:
        item = entries.get(node.get("id"))
        node["held_by"] = item["held_by"] if item else {LIVE: [], PERSISTENT: []}
        node["declared_for"] = item["declared_for"] if item else []
        node["flags"] = item["flags"] if item else []
        node["address"] = item["address"] if item else None
        _annotate(node.get("children") or [], entries)
    return nodes
