# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
name: usb_fleet
short_description: A KVM host's declared USB passthrough, with the domains of usb_fleet placed where they are defined
version_added: 0.2.0
description:
  - C(usb_fleet) declares domains by name alone, in the shape of C(usb_passthrough), each device selector naming the
    host the device is plugged into (C(host)), so that a declaration follows its domain across a live migration.
  - Places each domain of C(usb_fleet) on the host of O(reached) that has it (defined or running), from that host's
    C(ansible_facts.usb_domain_states) (M(kvmhost.usb.usb_facts)), and returns the declared state of O(host) -
    its C(usb_passthrough) with the domains of C(usb_fleet) placed on it. A selector whose C(host) is that host
    becomes a local selector; the others stay cross-host selectors.
  - A host is looked at for the domains its own C(usb_fleet) names (set it in the group vars of the KVM hosts).
  - Also returns the errors of the whole fleet, each a sentence naming the hosts, so that every host can refuse to
    change anything - a malformed C(usb_fleet) or a selector without C(host), a host not in the inventory, a domain
    declared in C(usb_fleet) and in a host's C(usb_passthrough), a domain defined on two hosts, a domain defined on
    none of the hosts that declare it when all of them were looked at, and a domain found on no host of O(reached)
    whose device is plugged into one of them (the host it is defined on is not in the play, as with C(--limit)).
    Found on no host of O(reached) otherwise, a domain is left alone (RV(_value.unplaced)).
  - The R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role) role calls it and keeps the
    declaration in C(usb_passthrough_declared), which the filter M(kvmhost.usb.usb_exports) reads for every host.
author:
  - kvmhost.usb contributors
options:
  _input:
    description: C(hostvars).
    type: dict
    required: true
  host:
    description: The host whose declaration is returned, C(inventory_hostname).
    type: str
    required: true
  hosts:
    description: The hosts whose C(usb_fleet) and C(usb_passthrough) are read, C(groups['all']).
    type: list
    elements: str
    required: true
  reached:
    description:
      - The hosts that read their domains in this run (M(kvmhost.usb.usb_facts)), C(ansible_play_batch). Only their
        C(usb_domain_states) is believed; another host's may be an old fact.
    type: list
    elements: str
    required: true
"""

EXAMPLES = r"""
- name: Where the domains are
  kvmhost.usb.usb_facts:
    domains_only: true

- name: This host's declared state, usb_fleet placed
  ansible.builtin.set_fact:
    declared: "{{ (hostvars | kvmhost.usb.usb_fleet(inventory_hostname, groups['all'], ansible_play_batch)).declaration }}"
"""

RETURN = r"""
_value:
  description: The declaration of O(host), where the domains of the fleet are, and the errors.
  type: dict
  contains:
    declaration:
      description: The C(usb_passthrough) of O(host) with the domains of C(usb_fleet) defined on it.
      type: dict
    placed:
      description: Each domain of C(usb_fleet) found on exactly one host, to that host.
      type: dict
    errors:
      description: What stops the fleet, one sentence each; empty when nothing does.
      type: list
      elements: str
    unplaced:
      description: >-
        The domains of C(usb_fleet) left alone, one sentence each: found on no host of O(reached), they may be on a
        host that is not (C(--limit)), and none of their devices is plugged into a host of O(reached).
      type: list
      elements: str
"""

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import PassthroughError
from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import local_selector, unknown_hosts, variable


def _fleet_of(hostvars, host):
    return variable(hostvars, host, "usb_fleet") or {}


def _passthrough_of(hostvars, host):
    return variable(hostvars, host, "usb_passthrough") or {}


def _domains_on(hostvars, host):
    """The names of the domains ``host`` listed in this run (usb_facts' usb_domain_states)."""
    facts = variable(hostvars, host, "ansible_facts") or {}
    return dict((state["name"], state["state"]) for state in facts.get("usb_domain_states") or [])


def _device_hosts(settings):
    return [str(selector["host"]) for selector in (settings or {}).get("devices") or [] if isinstance(selector, dict) and selector.get("host")]


def _names(hosts):
    hosts = list(hosts)
    return hosts[0] if len(hosts) == 1 else "%s and %s" % (", ".join(hosts[:-1]), hosts[-1])


def _declarers(hostvars, hosts, errors):
    """Each domain of the fleet to the hosts whose usb_fleet names it, with its settings there; a malformed usb_fleet is
    an error and places no domain. usb_fleet is usually the same for every host (group vars): its errors say it once."""
    declarers = {}
    for host in hosts:
        fleet = _fleet_of(hostvars, host)
        try:
            _declaration.normalize_fleet(fleet)
        except PassthroughError as error:
            errors.append("usb_fleet: %s." % error)
            continue
        for domain, settings in fleet.items():
            declarers.setdefault(str(domain), {})[host] = settings or {}
    return declarers


def _place(hostvars, domain, declarers, reached, errors, unplaced):
    """The host ``domain`` is defined on, or None (with an error or a sentence in ``unplaced`` saying why)."""
    looked = [host for host in declarers if host in reached]
    found = [host for host in looked if domain in _domains_on(hostvars, host)]
    if len(found) == 1:
        return found[0]
    if found:
        states = ["%s (%s)" % (host, _domains_on(hostvars, host)[domain]) for host in found]
        errors.append(
            "usb_fleet domain %s is defined on %s; a domain is defined on one host: undefine it on the hosts it left." % (domain, _names(states))
        )
        return None
    not_looked = [host for host in declarers if host not in reached]
    if not not_looked:
        errors.append("usb_fleet domain %s is defined on none of the hosts that declare it (looked at %s)." % (domain, _names(looked)))
        return None
    devices_here = sorted(set(device for settings in declarers.values() for device in _device_hosts(settings) if device in reached))
    where = "usb_fleet domain %s is on none of the hosts of this play (looked at %s) and may be on %s, not in it" % (
        domain, _names(looked) if looked else "none", _names(not_looked))
    if devices_here:
        errors.append("%s: its devices on %s would lose their exports. Add the host it is defined on to the play (--limit)." % (where, _names(devices_here)))
    else:
        unplaced.append("%s; left alone." % where)
    return None


def usb_fleet(hostvars, host, hosts, reached):
    """The declaration of ``host`` with the domains of usb_fleet it has, and what stops the fleet, for every host of
    ``hosts``: as with usb_exports, an error anywhere stops every host before anything changes."""
    errors = []
    unplaced = []
    placed = {}
    declarers = _declarers(hostvars, hosts, errors)
    for domain, settings_of in sorted(declarers.items()):
        for declarer, settings in settings_of.items():
            errors.extend(unknown_hosts(hostvars, settings.get("devices"), "usb_fleet.%s" % domain))
            passthrough = _passthrough_of(hostvars, declarer)
            if isinstance(passthrough, dict) and domain in passthrough:
                errors.append("Domain %s is declared in usb_fleet and in usb_passthrough of %s; declare it in one of them." % (domain, declarer))
        location = _place(hostvars, domain, settings_of, reached, errors, unplaced)
        if location is not None:
            placed[domain] = location
    declaration = _passthrough_of(hostvars, host)
    if isinstance(declaration, dict):
        declaration = dict(declaration)
        for domain, location in sorted(placed.items()):
            if location == host and domain not in declaration:
                settings = dict(declarers[domain][host])
                settings["devices"] = [local_selector(selector, host) for selector in settings.get("devices") or []]
                declaration[domain] = settings
    return {"declaration": declaration, "placed": placed, "errors": list(dict.fromkeys(errors)), "unplaced": unplaced}


class FilterModule:
    def filters(self):
        return {"usb_fleet": usb_fleet}
