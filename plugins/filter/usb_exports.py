# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: usb_exports
short_description: The USB devices a KVM host exports to the others, computed from the whole inventory
version_added: 0.1.0
description:
  - Reads C(usb_passthrough) of every other host of the inventory and returns the devices they declare with
    C(host) naming this host, one export each, as M(kvmhost.usb.usb_export) takes them. The declared state of the
    fleet stays one inventory; the R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role) role calls it.
  - An importer's address is its C(usb_link_address), else its C(ansible_host), else its inventory name.
  - Fails when a host's C(usb_passthrough) is malformed, with the message the modules give.
  - Also returns the conflicts of the whole declaration, each a sentence naming the hosts and domains involved
    - a device exported and also declared for a domain of its own host, and a device declared by two importers
    (or two domains). They are the fleet's, not only this host's, so that every host can refuse to change anything.
author:
  - kvmhost.usb contributors
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  host:
    description: The exporting host, C(inventory_hostname).
    type: str
    required: true
  hosts:
    description: The hosts whose C(usb_passthrough) is read, C(groups['all']).
    type: list
    elements: str
    required: true
"""

EXAMPLES = r"""
- name: The devices kvm1 exports
  ansible.builtin.set_fact:
    exported: "{{ hostvars | kvmhost.usb.usb_exports(inventory_hostname, groups['all']) }}"
"""

RETURN = r"""
_value:
  description: The exports and the conflicts.
  type: dict
  contains:
    exports:
      description: >-
        One per declared device: the selector's device fields as the importer declared them (C(id), C(vendor_id), ...)
        with C(importer) (inventory name), C(importer_address) and C(domain) (the importer's domain that gets it).
      type: list
      elements: dict
    conflicts:
      description: What contradicts itself, one sentence each; empty when nothing does.
      type: list
      elements: str
    link_address:
      description: The address O(host) is reached at by the others, where its exporter listens.
      type: str
    import_addresses:
      description: The link addresses of the hosts O(host) imports devices from.
      type: list
      elements: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import PassthroughError, SelectorError
from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import link_address


def _declared(hostvars, host):
    """The host's usb_passthrough as it is written, once its shape is checked (``_declaration``, as the modules check it)."""
    try:
        declared = hostvars[host].get("usb_passthrough") or {}
    except KeyError:
        return {}
    try:
        _declaration.normalize_declaration(declared)
    except PassthroughError as error:
        raise AnsibleFilterError("usb_exports: usb_passthrough of %s: %s" % (host, error))
    return declared


def _selectors(settings):
    return (settings or {}).get("devices") or []


def _device_key(selector):
    """The selector's device fields, normalised, to compare two declarations of one device."""
    try:
        return tuple(sorted(_declaration.device_fields(_declaration.normalize_selector(selector)).items()))
    except SelectorError as error:
        raise AnsibleFilterError("usb_exports: %s" % error)


def _exports_of(hostvars, host, hosts):
    exports = []
    conflicts = []
    owners = {}
    for importer in hosts:
        if importer == host:
            continue
        for domain, settings in sorted(_declared(hostvars, importer).items()):
            for selector in _selectors(settings):
                if not isinstance(selector, dict) or str(selector.get("host") or "") != host:
                    continue
                fields = dict((key, value) for key, value in selector.items() if key not in _declaration.REMOTE_FIELDS)
                key = _device_key(fields)
                if key in owners:
                    conflicts.append(
                        "Device (%s) on %s is declared for %s on %s and for %s on %s; one device goes to one VM."
                        % (_declaration.describe_selector(dict(key)), host, owners[key][1], owners[key][0], domain, importer)
                    )
                    continue
                owners[key] = (importer, domain)
                exports.append(dict(fields, importer=importer, importer_address=link_address(hostvars, importer), domain=str(domain)))
    for domain, settings in sorted(_declared(hostvars, host).items()):
        for selector in _selectors(settings):
            if isinstance(selector, dict) and selector.get("host") and str(selector["host"]) != host:
                continue
            key = _device_key(selector)
            if key in owners:
                conflicts.append(
                    "Device (%s) on %s is declared for its domain %s and exported to %s for %s; one device goes to one VM."
                    % (_declaration.describe_selector(dict(key)), host, domain, owners[key][0], owners[key][1])
                )
    return exports, conflicts


def _unknown_hosts(hostvars, host):
    """A sentence for each selector of ``host`` that names a host the inventory does not have."""
    unknown = []
    for domain, settings in sorted(_declared(hostvars, host).items()):
        for selector in _selectors(settings):
            if isinstance(selector, dict) and selector.get("host") and str(selector["host"]) not in hostvars:
                unknown.append(
                    "usb_passthrough.%s of %s: host %s is not in the inventory. A selector's host is the inventory name of the KVM"
                    " host the device is plugged into." % (domain, host, selector["host"])
                )
    return unknown


def _import_addresses(hostvars, host):
    """The link addresses of the hosts ``host`` imports devices from (its selectors with ``host``, or with
    ``link_address``)."""
    addresses = []
    for _domain, settings in sorted(_declared(hostvars, host).items()):
        for selector in _selectors(settings):
            if not isinstance(selector, dict):
                continue
            if selector.get("link_address"):
                address = str(selector["link_address"])
            elif selector.get("host") and str(selector["host"]) != host:
                exporter = str(selector["host"])
                if exporter not in hostvars:
                    continue  # a conflict (_unknown_hosts): the role stops before this is used
                address = link_address(hostvars, exporter)
            else:
                continue
            if address not in addresses:
                addresses.append(address)
    return addresses


def usb_exports(hostvars, host, hosts):
    """The exports of ``host``, and the conflicts of every host of ``hosts``: a declaration that contradicts itself
    anywhere in the fleet stops every host before anything changes, not only the exporting one. Also where ``host`` is
    reached (its exporter listens there) and the addresses of the hosts it imports from, resolved as the action plugins
    resolve them."""
    exports, conflicts = _exports_of(hostvars, host, hosts)
    for other in hosts:
        if other != host:
            conflicts.extend(_exports_of(hostvars, other, hosts)[1])
        conflicts.extend(_unknown_hosts(hostvars, other))
    return {"exports": exports, "conflicts": conflicts, "link_address": link_address(hostvars, host), "import_addresses": _import_addresses(hostvars, host)}


class FilterModule:
    def filters(self):
        return {"usb_exports": usb_exports}
