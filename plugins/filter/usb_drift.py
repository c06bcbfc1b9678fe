# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: usb_drift
short_description: Compare a KVM host's USB devices and domains with the declared passthrough state
version_added: 0.1.0
description:
  - Takes the facts of M(kvmhost.usb.usb_facts) (C(usb_devices), C(usb_topology), C(usb_domains)) and the
    declared state of the M(kvmhost.usb.passthrough) role (C(usb_passthrough)), and says where they differ,
    like Cloudpods' C(host-probe-isolated-devices) but without changing anything.
  - Declared devices are those of C(usb_passthrough) and those the domains' intent names
    (what M(kvmhost.usb.usb_attach) recorded in their C(<metadata>)).
  - Drift is a declared device that is missing or held elsewhere, a device an exclusive domain holds without
    declaring it, a hostdev bound to a stale bus/device address, a selector that matches several devices or
    none that can be read, and a declared domain the host does not have. Devices nobody holds, declares or
    intends are listed as unclaimed, which is not drift.
author:
  - kvmhost.usb contributors
options:
  _input:
    description: The host's C(ansible_facts) after M(kvmhost.usb.usb_facts).
    type: dict
    required: true
  declared:
    description: The host's C(usb_passthrough), domain name to C(devices) (selectors), C(exclusive), ...
    type: dict
    default: {}
"""

EXAMPLES = r"""
- name: Gather the USB devices and domains
  kvmhost.usb.usb_facts:

- name: Show the drift
  ansible.builtin.debug:
    msg: "{{ ansible_facts | kvmhost.usb.usb_drift(usb_passthrough | default({})) }}"
"""

RETURN = r"""
_value:
  description: What the host has, and where it differs from the declared state.
  type: dict
  contains:
    devices:
      description: >-
        The passthrough candidates present, each with C(id), C(address), C(port), C(model), C(vendor_device_id),
        C(serial), C(held_by) (C(live) and C(persistent) domain lists), C(intended_for), C(declared_for) and
        C(flags) (C(unclaimed), C(conflict)).
      type: list
      elements: dict
    tree:
      description: C(usb_topology) with C(held_by), C(declared_for) and C(flags) added to each device.
      type: list
      elements: dict
    domains:
      description: >-
        Each domain of the host and each declared one: C(name), C(state) (null when the host lacks it),
        C(declared), C(exclusive), C(holds) (device ids), C(stale) (hostdev addresses).
      type: list
      elements: dict
    missing:
      description: Declared devices that are not plugged in, each C(domain), C(device) and C(source) (C(intent) or C(inventory)).
      type: list
      elements: dict
    unattached:
      description: Declared devices that are present but not held by their domain, each C(domain), C(device), C(held_by).
      type: list
      elements: dict
    undeclared:
      description: Devices held by an exclusive domain that does not declare them, each C(domain), C(device).
      type: list
      elements: dict
    stale:
      description: Hostdevs bound to a bus/device address with no such device, each C(domain), C(scope), C(address), C(vendor_device_id).
      type: list
      elements: dict
    invalid:
      description: Declared selectors that match several devices or cannot be read, each C(domain), C(selector), C(error).
      type: list
      elements: dict
    unknown_domains:
      description: Declared domains the host does not have.
      type: list
      elements: str
    unclaimed:
      description: Ids of the devices nobody holds, intends or declares.
      type: list
      elements: str
    summary:
      description: >-
        The same in lines to read: C(present) (one per device, with its holders or flags), C(missing),
        C(unclaimed), C(stale) and C(drift) (unattached, undeclared, invalid and unknown domains).
      type: dict
    drift:
      description: Whether any of RV(_value.missing), RV(_value.unattached), RV(_value.undeclared), RV(_value.stale),
        RV(_value.invalid) or RV(_value.unknown_domains) is not empty.
      type: bool
"""

import copy

from ansible.errors import AnsibleFilterError

from ansible_collections.kvmhost.usb.plugins.module_utils import _usb

SCOPES = ("live", "persistent")
SOURCES = {"intent": "recorded in its intent", "inventory": "declared in the inventory"}
DRIFT = ("missing", "unattached", "undeclared", "stale", "invalid", "unknown_domains")


def _selector_text(selector):
    if isinstance(selector, dict):
        return _usb.describe_selector(selector) or str(selector)
    return str(selector)


def _declared_domains(declared):
    if not isinstance(declared, dict):
        raise AnsibleFilterError("usb_drift: the declared state must map domain names to settings, got %r" % (declared,))
    domains = {}
    for name, settings in declared.items():
        settings = settings or {}
        if not isinstance(settings, dict):
            raise AnsibleFilterError("usb_drift: the settings of domain %s must be a mapping, got %r" % (name, settings))
        domains[str(name)] = {"devices": list(settings.get("devices") or []), "exclusive": bool(settings.get("exclusive", False))}
    return domains


def usb_drift(facts, declared=None):
    declared = _declared_domains(declared or {})
    devices = [device for device in facts.get("usb_devices") or [] if not device.get("is_hub")]
    by_id = dict((device["id"], device) for device in devices)
    host_domains = dict((domain["name"], domain) for domain in facts.get("usb_domains") or [])
    report = dict((key, []) for key in DRIFT)

    entries = {}
    for device in devices:
        attached = device.get("attached_to") or {}
        entries[device["id"]] = {
            "id": device["id"],
            "address": device.get("address"),
            "port": device.get("port"),
            "model": device.get("model"),
            "vendor_device_id": device.get("vendor_device_id"),
            "serial": device.get("serial"),
            "held_by": dict((scope, list(attached.get(scope) or [])) for scope in SCOPES),
            "intended_for": [],
            "declared_for": [],
            "flags": [],
        }

    intents = {}
    domains = []
    for name, domain in sorted(host_domains.items()):
        intent = []
        stale = []
        for scope in SCOPES:
            config = domain.get(scope)
            if not config:
                continue
            for entry in config.get("intent") or []:
                if entry["id"] not in [known["id"] for known in intent]:
                    intent.append({"id": entry["id"], "selector": entry.get("selector") or {}})
            for hostdev in config.get("hostdevs") or []:
                if hostdev.get("stale"):
                    vendor_device_id = "%s:%s" % (hostdev.get("vendor_id") or "????", hostdev.get("product_id") or "????")
                    report["stale"].append({"domain": name, "scope": scope, "address": hostdev["address"], "vendor_device_id": vendor_device_id})
                    if hostdev["address"] not in stale:
                        stale.append(hostdev["address"])
        intents[name] = intent
        for entry in intent:
            device = entries.get(entry["id"])
            if device is None:
                report["missing"].append({"domain": name, "device": entry["id"], "source": "intent"})
                continue
            device["intended_for"].append(name)
            holders = sorted(set(device["held_by"]["live"] + device["held_by"]["persistent"]))
            if name not in holders:
                report["unattached"].append({"domain": name, "device": entry["id"], "held_by": holders})
        holds = sorted(device_id for device_id, entry in entries.items() if any(name in entry["held_by"][scope] for scope in SCOPES))
        settings = declared.get(name)
        domains.append(
            {
                "name": name,
                "state": domain.get("state"),
                "declared": settings is not None,
                "exclusive": bool(settings and settings["exclusive"]),
                "holds": holds,
                "stale": stale,
            }
        )

    for name, settings in sorted(declared.items()):
        if name not in host_domains:
            report["unknown_domains"].append(name)
            domains.append({"name": name, "state": None, "declared": True, "exclusive": settings["exclusive"], "holds": [], "stale": []})
        chosen = []
        for selector in settings["devices"]:
            try:
                normalized = _usb.normalize_selector(selector)
            except _usb.SelectorError as error:
                report["invalid"].append({"domain": name, "selector": _selector_text(selector), "error": str(error)})
                continue
            matches = [device for device in devices if _usb.selector_matches(normalized, device)]
            if len(matches) > 1:
                report["invalid"].append(
                    {
                        "domain": name,
                        "selector": _usb.describe_selector(normalized),
                        "error": "ambiguous: %s match" % ", ".join(device["id"] for device in matches),
                    }
                )
                continue
            if not matches:
                recorded = [entry for entry in intents.get(name, []) if entry["selector"] == normalized or entry["id"] == normalized.get("id")]
                if not recorded:
                    report["missing"].append({"domain": name, "device": _usb.describe_selector(normalized), "source": "inventory"})
                continue
            entry = entries[matches[0]["id"]]
            chosen.append(entry["id"])
            if name not in entry["declared_for"]:
                entry["declared_for"].append(name)
            holders = sorted(set(entry["held_by"]["live"] + entry["held_by"]["persistent"]))
            unattached = {"domain": name, "device": entry["id"], "held_by": holders}
            if name in host_domains and name not in holders and unattached not in report["unattached"]:
                report["unattached"].append(unattached)
        if settings["exclusive"] and name in host_domains:
            for domain in domains:
                if domain["name"] == name:
                    for device_id in domain["holds"]:
                        if device_id not in chosen:
                            report["undeclared"].append({"domain": name, "device": device_id})

    for entry in entries.values():
        holders = set(entry["held_by"]["live"] + entry["held_by"]["persistent"])
        claimants = holders | set(entry["intended_for"]) | set(entry["declared_for"])
        if not claimants:
            entry["flags"].append("unclaimed")
        elif len(claimants) > 1:
            entry["flags"].append("conflict")

    report["devices"] = [entries[device["id"]] for device in devices]
    report["tree"] = _annotate(copy.deepcopy(facts.get("usb_topology") or []), entries)
    report["domains"] = sorted(domains, key=lambda domain: domain["name"])
    report["unclaimed"] = [entry["id"] for entry in report["devices"] if "unclaimed" in entry["flags"]]
    report["drift"] = any(report[key] for key in DRIFT)
    report["summary"] = _summary(report)
    return report


def _holders_text(held_by):
    names = []
    for name in held_by["live"] + held_by["persistent"]:
        if name not in names:
            names.append(name)
    return ", ".join("%s (%s)" % (name, ", ".join(scope for scope in SCOPES if name in held_by[scope])) for name in names)


def _summary(report):
    present = []
    for entry in report["devices"]:
        line = "%s %s port %s %s" % (entry["id"], entry["address"], entry["port"], entry["model"] or "")
        holders = _holders_text(entry["held_by"])
        if holders:
            line += ": held by " + holders
        if entry["flags"]:
            line += " [%s]" % ", ".join(entry["flags"])
        present.append(line)
    drift = ["%s: declares %s, held by %s" % (item["domain"], item["device"], ", ".join(item["held_by"]) or "nobody") for item in report["unattached"]]
    drift += ["%s (exclusive): holds %s, which it does not declare" % (item["domain"], item["device"]) for item in report["undeclared"]]
    drift += ["%s: selector (%s): %s" % (item["domain"], item["selector"], item["error"]) for item in report["invalid"]]
    drift += ["%s: declared, but the host has no such domain" % name for name in report["unknown_domains"]]
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


def _annotate(nodes, entries):
    for node in nodes:
        entry = entries.get(node.get("id"))
        node["held_by"] = entry["held_by"] if entry else {"live": [], "persistent": []}
        node["declared_for"] = entry["declared_for"] if entry else []
        node["flags"] = entry["flags"] if entry else []
        node["address"] = entry["address"] if entry else None
        _annotate(node.get("children") or [], entries)
    return nodes


class FilterModule:
    def filters(self):
        return {"usb_drift": usb_drift}
