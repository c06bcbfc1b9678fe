# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The controller's placing of ``usb_fleet``: each domain it declares is placed on the host of the play that has it
(defined or running, from that host's ``usb_domain_states``), and joins that host's declared state. The filters
``usb_fleet`` and ``usb_exports`` both place with it, so that the role computes each host's declared state and its
exports in one step.
"""

from __future__ import annotations

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


def place(hostvars, hosts, reached):
    """Where each domain of usb_fleet is, and what stops the fleet, for every host of ``hosts``: an error anywhere stops
    every host before anything changes. ``{placed, errors, unplaced, declarers}``."""
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
    return {"placed": placed, "errors": list(dict.fromkeys(errors)), "unplaced": unplaced, "declarers": declarers}


def declaration(hostvars, host, placement):
    """The declared state of ``host``: its usb_passthrough with the domains of usb_fleet placed on it, their selectors
    naming ``host`` made local."""
    declared = _passthrough_of(hostvars, host)
    if not isinstance(declared, dict):
        return declared
    declared = dict(declared)
    for domain, location in sorted(placement["placed"].items()):
        if location == host and domain not in declared:
            settings = dict(placement["declarers"][domain][host])
            settings["devices"] = [local_selector(selector, host) for selector in settings.get("devices") or []]
            declared[domain] = settings
    return declared
