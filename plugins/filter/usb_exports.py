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
  - With O(reached), places the domains of C(usb_fleet) first, as the filter P(kvmhost.usb.usb_fleet#filter) does, and reads
    each host's C(usb_passthrough) with the domains of C(usb_fleet) defined on it; the placing's errors are conflicts.
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
  reached:
    description:
      - The hosts that listed their domains in this run (M(kvmhost.usb.usb_facts) with C(domains_only)),
        C(ansible_play_batch); only their C(usb_domain_states) is believed. Unset, C(usb_fleet) is not read.
    type: list
    elements: str
    version_added: 0.2.0
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
    declaration:
      description: The declared state of O(host), its C(usb_passthrough) with the domains of C(usb_fleet) placed on it.
      type: dict
      version_added: 0.2.0
    unplaced:
      description: The domains of C(usb_fleet) left alone (on no host of O(reached)), one sentence each.
      type: list
      elements: str
      version_added: 0.2.0
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
      description: The USB/IP addresses of the hosts O(host) imports devices from (their tunnel addresses; with
        C(usb_link_encryption=none) their link addresses).
      type: list
      elements: str
    listen_address:
      description: Where the exporter of O(host) listens; its tunnel address, or its link address without encryption.
      type: str
    encryption:
      description: The C(usb_link_encryption) of O(host), V(wireguard) unless set to V(none).
      type: str
    peers:
      description: The hosts O(host) shares devices with (exports to or imports from), each with C(name), C(link_address),
        C(tunnel_address) (None without encryption) and C(endpoint) (the WireGuard endpoint, link address and port).
      type: list
      elements: dict
    link:
      description: >-
        The WireGuard link of O(host) as M(kvmhost.usb.usb_runtime) takes it, without the peers' public keys and the MTU,
        which the hosts give (M(kvmhost.usb.usb_link)); None when O(host) has no peer or no encryption.
      type: dict
    clear_links:
      description: The pairs of hosts of the fleet that share devices in clear text (C(usb_link_encryption=none)), one
        sentence each.
      type: list
      elements: str
"""

from ansible.errors import AnsibleFilterError

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _link
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LinkError, PassthroughError, SelectorError
from ansible_collections.kvmhost.usb.plugins.plugin_utils import _fleet
from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import (
    ENCRYPTIONS,
    encryption,
    link_address,
    tunnel_address,
    tunnel_network,
    unknown_hosts,
    usbip_address,
    variable,
)


class _Placed:
    """``hostvars`` with each host's declared state placed: its usb_passthrough with the domains of usb_fleet on it."""

    def __init__(self, hostvars, declarations):
        self.hostvars = hostvars
        self.declarations = declarations

    def __getitem__(self, host):
        return self.hostvars[host]

    def __contains__(self, host):
        return host in self.hostvars


def _declared(hostvars, host):
    """The host's declared state, once its shape is checked (``_declaration``, as the modules check it): placed with
    usb_fleet when the role passed the hosts of the play, else usb_passthrough as it is written."""
    try:
        variables = hostvars[host]
    except KeyError:
        return {}
    declared = hostvars.declarations.get(host) if isinstance(hostvars, _Placed) else None
    if declared is None:
        declared = variables.get("usb_passthrough") or {}
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
                exports.append(dict(fields, importer=importer, importer_address=_usbip_address(hostvars, importer), domain=str(domain)))
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
        unknown.extend(unknown_hosts(hostvars, _selectors(settings), "usb_passthrough.%s of %s" % (domain, host)))
    return unknown


def _usbip_address(hostvars, host):
    try:
        return usbip_address(hostvars, host)
    except LinkError:
        return None  # a conflict (_link_conflicts): the role stops before this is used


def _exporters(hostvars, host):
    """The hosts of the inventory ``host`` imports devices from (its selectors with ``host``)."""
    found = []
    for _domain, settings in sorted(_declared(hostvars, host).items()):
        for selector in _selectors(settings):
            exporter = str(selector.get("host") or "") if isinstance(selector, dict) else ""
            if exporter and exporter != host and exporter in hostvars and exporter not in found:
                found.append(exporter)
    return found


def _import_addresses(hostvars, host):
    """The USB/IP addresses of the hosts ``host`` imports devices from (its selectors with ``host``, or with
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
                address = _usbip_address(hostvars, exporter)
            else:
                continue
            if address and address not in addresses:
                addresses.append(address)
    return addresses


def _pairs(hostvars, hosts):
    """Every pair of hosts that share devices, each once, sorted: ``[(exporter or importer, the other), ...]``."""
    pairs = set()
    for host in hosts:
        for exporter in _exporters(hostvars, host):
            pairs.add(tuple(sorted((host, exporter))))
    return sorted(pairs)


def _link_conflicts(hostvars, pairs):
    """What stops the links of the fleet: a host's encryption unknown, two ends of a link with different encryption,
    two linked hosts with one link address or one tunnel address, a tunnel address that cannot be derived."""
    conflicts = []
    linked = sorted(set(host for pair in pairs for host in pair))
    for host in linked:
        if encryption(hostvars, host) not in ENCRYPTIONS:
            conflicts.append("usb_link_encryption of %s is %r; it is wireguard or none." % (host, encryption(hostvars, host)))
    for first, second in pairs:
        both = (encryption(hostvars, first), encryption(hostvars, second))
        if both[0] != both[1] and set(both) <= set(ENCRYPTIONS):
            conflicts.append(
                "Hosts %s (usb_link_encryption %s) and %s (usb_link_encryption %s) share USB devices over one link: set the"
                " same usb_link_encryption on both." % (first, encryption(hostvars, first), second, encryption(hostvars, second))
            )
    for what, address_of in (("link address", link_address), ("tunnel address", tunnel_address)):
        holders = {}
        for host in linked:
            if what == "tunnel address" and encryption(hostvars, host) != "wireguard":
                continue
            try:
                address = address_of(hostvars, host)
            except LinkError as error:
                conflicts.append("%s." % error)
                continue
            if address in holders:
                conflicts.append("Hosts %s and %s have the same %s %s; each host needs its own." % (holders[address], host, what, address))
            holders.setdefault(address, host)
    return conflicts


def _peers(hostvars, host, pairs):
    peers = []
    for pair in pairs:
        if host not in pair:
            continue
        peer = pair[1] if pair[0] == host else pair[0]
        address = link_address(hostvars, peer)
        port = variable(hostvars, peer, "usb_link_wireguard_port") or _link.WIREGUARD_PORT
        tunnel = _tunnel_address(hostvars, peer)
        peers.append(
            {
                "name": peer,
                "link_address": address,
                "tunnel_address": tunnel,
                "endpoint": (("[%s]:%s" if ":" in address else "%s:%s") % (address, port)) if tunnel else None,
            }
        )
    return peers


def _tunnel_address(hostvars, host):
    if encryption(hostvars, host) != "wireguard":
        return None
    try:
        return tunnel_address(hostvars, host)
    except LinkError:
        return None


def _wireguard_link(hostvars, host, peers):
    """The WireGuard link of ``host`` for usb_runtime, without public keys and MTU; None without one."""
    address = _tunnel_address(hostvars, host)
    if not peers or address is None:
        return None
    return {
        "address": "%s/%s" % (address, tunnel_network(hostvars, host).split("/")[1]),
        "listen_port": int(variable(hostvars, host, "usb_link_wireguard_port") or _link.WIREGUARD_PORT),
        "usbip_port": int(variable(hostvars, host, "usb_link_port") or 3240),
        "peers": [{"name": peer["name"], "endpoint": peer["endpoint"], "tunnel_address": peer["tunnel_address"]} for peer in peers],
    }


def usb_exports(hostvars, host, hosts, reached=None):
    """The exports of ``host``, and the conflicts of every host of ``hosts``: a declaration that contradicts itself
    anywhere in the fleet stops every host before anything changes, not only the exporting one. Also where ``host`` is
    reached (its exporter listens there) and the addresses of the hosts it imports from, resolved as the action plugins
    resolve them. With ``reached`` (the hosts of the play), the domains of usb_fleet are placed first (``_fleet``)."""
    placement = {"placed": {}, "errors": [], "unplaced": []}
    if reached is not None:
        placement = _fleet.place(hostvars, hosts, reached)
        hostvars = _Placed(hostvars, dict((other, _fleet.declaration(hostvars, other, placement)) for other in hosts))
    exports, conflicts = _exports_of(hostvars, host, hosts)
    conflicts = placement["errors"] + conflicts
    for other in hosts:
        if other != host:
            conflicts.extend(_exports_of(hostvars, other, hosts)[1])
        conflicts.extend(_unknown_hosts(hostvars, other))
    pairs = _pairs(hostvars, hosts)
    conflicts.extend(_link_conflicts(hostvars, pairs))
    peers = _peers(hostvars, host, pairs)
    return {
        "declaration": _declared(hostvars, host),
        "unplaced": placement["unplaced"],
        "exports": exports,
        "conflicts": conflicts,
        "link_address": link_address(hostvars, host),
        "listen_address": _usbip_address(hostvars, host) or link_address(hostvars, host),
        "import_addresses": _import_addresses(hostvars, host),
        "encryption": encryption(hostvars, host),
        "peers": peers,
        "link": _wireguard_link(hostvars, host, peers),
        "clear_links": [
            "%s and %s share USB devices in clear text (usb_link_encryption none)" % pair
            for pair in pairs if encryption(hostvars, pair[0]) == "none" or encryption(hostvars, pair[1]) == "none"
        ],
    }


class FilterModule:
    def filters(self):
        return {"usb_exports": usb_exports}
