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
  - The filter P(kvmhost.usb.usb_exports#filter), given the hosts of the play, places C(usb_fleet) the same way; the
    R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role) role calls that one. This one shows a
    host's declared state, as the probe playbook does.
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

from ansible_collections.kvmhost.usb.plugins.plugin_utils import _fleet


def usb_fleet(hostvars, host, hosts, reached):
    """The declaration of ``host`` with the domains of usb_fleet it has, and what stops the fleet, for every host of
    ``hosts``: as with usb_exports, an error anywhere stops every host before anything changes."""
    placement = _fleet.place(hostvars, hosts, reached)
    return {
        "declaration": _fleet.declaration(hostvars, host, placement),
        "placed": placement["placed"],
        "errors": placement["errors"],
        "unplaced": placement["unplaced"],
    }


class FilterModule:
    def filters(self):
        return {"usb_fleet": usb_fleet}
