# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: usb_drift
short_description: Compare a KVM host's USB devices and domains with the declared passthrough state
version_added: 0.1.0
description:
  - Takes the facts of M(kvmhost.usb.usb_facts) (C(usb_devices), C(usb_topology), C(usb_domains)) and the
    declared state of the R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role) role (C(usb_passthrough)),
    and says where they differ, like Cloudpods' C(host-probe-isolated-devices) but without changing anything.
  - It asks the same host model as M(kvmhost.usb.usb_passthrough), whose check mode returns the same report as RV(_value)
    computed on the host (C(drift)).
  - Declared devices are those of C(usb_passthrough) and those the domains' intent names
    (what M(kvmhost.usb.usb_attach) recorded in their C(<metadata>)).
  - Drift is a declared device that is missing or held elsewhere, a device an exclusive domain holds without
    declaring it, a hostdev bound to a stale bus/device address, a selector that matches several devices or
    none that can be read, a declared domain the host does not have, and a domain whose persistent configuration
    could not start as it is. Devices nobody holds, declares or intends are listed as unclaimed, which is not drift.
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
    unstartable:
      description: >-
        Domains whose persistent configuration libvirt would refuse to start, each C(domain) and C(reason): a hostdev that
        designates several devices (a twin appeared beside a device named by vendor:product), or a mandatory one that
        designates none.
      type: list
      elements: dict
    unclaimed:
      description: Ids of the devices nobody holds, intends or declares.
      type: list
      elements: str
    summary:
      description: >-
        The same in lines to read: C(present) (one per device, with its holders or flags), C(missing),
        C(unclaimed), C(stale) and C(drift) (unattached, undeclared, invalid, unknown and unstartable domains).
      type: dict
    drift:
      description: Whether any of RV(_value.missing), RV(_value.unattached), RV(_value.undeclared), RV(_value.stale),
        RV(_value.invalid), RV(_value.unknown_domains) or RV(_value.unstartable) is not empty.
      type: bool
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.kvmhost.usb.plugins.module_utils import _host


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
    """The host model of the facts, asked the same question usb_passthrough answers on the host."""
    model = _host.HostModel.from_facts(facts)
    return model.drift(_declared_domains(declared or {}), facts.get("usb_topology") or [])


class FilterModule:
    def filters(self):
        return {"usb_drift": usb_drift}
