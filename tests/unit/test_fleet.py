"""usb_fleet, the declaration keyed by domain alone: usb_facts' domain listing, the usb_fleet filter on hostvars
dicts (several hosts, each with the domains it listed), the usb_exports filter reading its result, and the
passthrough role through ansible-playbook over an inventory of hosts that all connect locally, told apart by their
libvirt URIs (the run's own libvirtd for one, libvirt's test driver for the others, whose domains a file describes).

Two real hosts, with a device imported across, are in tests/integration/test_crosshost_testhost.py.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from tests.lib import modrun
from tests.lib.domain_xml import hostdev, hostdevs, metadata
from tests.lib.domains import URI
from tests.lib.modrun import run_module
from tests.lib.playbook import shown
from tests.lib.trees import KINGSTON_ID, REFERENCE

sys.path.insert(0, modrun.collection_root())

from ansible_collections.kvmhost.usb.plugins.filter.usb_exports import usb_exports  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.filter.usb_fleet import usb_fleet  # noqa: E402

STICK_ID = "46f4:0001:KING0001"
CLEAR = {"usb_link_encryption": "none"}
FLEET = {"buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, {"host": "kvm2", "id": STICK_ID}], "exclusive": True}}


def on(*domains, state="running"):
    """The facts of a host whose libvirt lists ``domains``."""
    return {"ansible_facts": {"usb_domain_states": [{"name": name, "state": state, "persistent": True} for name in domains]}}


def hostvars_of(**hosts):
    """Three hosts with usb_fleet FLEET (their group vars), each with its link address, updated by ``hosts``."""
    hostvars = dict(
        (name, dict(CLEAR, usb_fleet=FLEET, usb_link_address="10.77.0.%d" % number, **on()))
        for number, name in enumerate(("kvm1", "kvm2", "kvm3"), start=1)
    )
    for name, variables in hosts.items():
        hostvars[name].update(variables)
    return hostvars


def placed(hostvars, reached=("kvm1", "kvm2", "kvm3")):
    """Every host's result, as the role's set_fact gives each host its own."""
    return dict((host, usb_fleet(hostvars, host, sorted(hostvars), list(reached))) for host in reached)


# The filter


def test_a_fleet_domain_joins_the_declaration_of_the_host_it_is_defined_on_its_own_devices_there_local():
    results = placed(hostvars_of(kvm3=on("buildvm", "other")))
    assert results["kvm3"]["errors"] == []
    assert results["kvm3"]["placed"] == {"buildvm": "kvm3"}
    assert results["kvm3"]["declaration"] == {"buildvm": FLEET["buildvm"]}
    assert results["kvm1"]["declaration"] == {} and results["kvm2"]["declaration"] == {}

    moved = placed(hostvars_of(kvm1=on("buildvm")))
    assert moved["kvm1"]["declaration"] == {"buildvm": {"devices": [{"id": KINGSTON_ID}, {"host": "kvm2", "id": STICK_ID}], "exclusive": True}}
    assert moved["kvm3"]["declaration"] == {}


def test_a_stopped_or_transient_domain_is_placed_where_it_is_listed():
    stopped = hostvars_of(kvm2=on("buildvm", state="shutoff"))
    assert placed(stopped)["kvm2"]["placed"] == {"buildvm": "kvm2"}
    transient = hostvars_of(kvm2={"ansible_facts": {"usb_domain_states": [{"name": "buildvm", "state": "running", "persistent": False}]}})
    assert placed(transient)["kvm2"]["declaration"]["buildvm"]["devices"] == [{"host": "kvm1", "id": KINGSTON_ID}, {"id": STICK_ID}]


def test_usb_exports_sees_the_fleet_domain_on_the_host_it_is_defined_on():
    hostvars = hostvars_of(kvm3=on("buildvm"))
    for host, result in placed(hostvars).items():
        hostvars[host]["usb_passthrough_declared"] = result["declaration"]
    kvm1 = usb_exports(hostvars, "kvm1", sorted(hostvars))
    assert kvm1["conflicts"] == []
    assert kvm1["exports"] == [{"id": KINGSTON_ID, "importer": "kvm3", "importer_address": "10.77.0.3", "domain": "buildvm"}]
    assert usb_exports(hostvars, "kvm2", sorted(hostvars))["exports"] == [
        {"id": STICK_ID, "importer": "kvm3", "importer_address": "10.77.0.3", "domain": "buildvm"}
    ]
    assert usb_exports(hostvars, "kvm3", sorted(hostvars))["import_addresses"] == ["10.77.0.1", "10.77.0.2"]


def test_a_fleet_device_on_the_host_the_domain_is_defined_on_is_not_exported():
    hostvars = hostvars_of(kvm1=on("buildvm"))
    for host, result in placed(hostvars).items():
        hostvars[host]["usb_passthrough_declared"] = result["declaration"]
    assert usb_exports(hostvars, "kvm1", sorted(hostvars))["exports"] == []
    assert usb_exports(hostvars, "kvm2", sorted(hostvars))["exports"] == [
        {"id": STICK_ID, "importer": "kvm1", "importer_address": "10.77.0.1", "domain": "buildvm"}
    ]


def test_a_mixed_fleet_keeps_each_hosts_usb_passthrough():
    own = {"testvm": {"devices": ["0627:0001:42"]}}
    results = placed(hostvars_of(kvm2=dict(on("buildvm", "testvm"), usb_passthrough=own), kvm3={"usb_passthrough": {"other": {}}}))
    assert results["kvm2"]["errors"] == []
    assert results["kvm2"]["declaration"] == {"testvm": own["testvm"], "buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, {"id": STICK_ID}], "exclusive": True}}
    assert results["kvm3"]["declaration"] == {"other": {}}
    assert results["kvm1"]["declaration"] == {}


def test_without_usb_fleet_the_declaration_is_usb_passthrough_as_it_is():
    hostvars = {"kvm1": {"usb_passthrough": {"vm": {"devices": ["0951:1666"]}}}, "kvm2": {"usb_passthrough": "not a mapping"}}
    assert usb_fleet(hostvars, "kvm1", ["kvm1", "kvm2"], ["kvm1", "kvm2"]) == {
        "declaration": {"vm": {"devices": ["0951:1666"]}}, "placed": {}, "errors": [], "unplaced": []
    }
    # usb_exports says what is wrong with it, as before usb_fleet.
    assert usb_fleet(hostvars, "kvm2", ["kvm1", "kvm2"], ["kvm1", "kvm2"])["declaration"] == "not a mapping"


@pytest.mark.parametrize(
    "hosts, error",
    [
        (
            {"kvm1": on("buildvm"), "kvm2": {"usb_passthrough": {"buildvm": {}}}},
            "Domain buildvm is declared in usb_fleet and in usb_passthrough of kvm2; declare it in one of them.",
        ),
        (
            {"kvm1": on("buildvm"), "kvm3": on("buildvm", state="shutoff")},
            "usb_fleet domain buildvm is defined on kvm1 (running) and kvm3 (shutoff); a domain is defined on one host: undefine it on the hosts it left.",
        ),
        ({}, "usb_fleet domain buildvm is defined on none of the hosts that declare it (looked at kvm1, kvm2 and kvm3)."),
        (
            {"kvm1": dict(on("buildvm"), usb_fleet={"buildvm": {"devices": [{"host": "kvm9", "id": STICK_ID}]}})},
            "usb_fleet.buildvm: host kvm9 is not in the inventory. A selector's host is the inventory name of the KVM host the device is plugged into.",
        ),
        (
            {"kvm1": dict(on("buildvm"), usb_fleet={"buildvm": {"devices": [KINGSTON_ID]}})},
            "usb_fleet: Domain buildvm: selector (id=%s) names no host; in usb_fleet each device says the host it is plugged into (host: kvm1)." % KINGSTON_ID,
        ),
        (
            {"kvm1": dict(on("buildvm"), usb_fleet={"buildvm": {"devices": [{"host": "kvm2", "id": STICK_ID}], "exlusive": True}})},
            "usb_fleet: Domain buildvm: unknown setting(s) exlusive; accepted: devices, exclusive, auto_start, steal, controller.",
        ),
    ],
    ids=["in usb_passthrough too", "defined on two hosts", "defined on none", "unknown host", "no host", "misspelt setting"],
)
def test_an_error_of_the_fleet_stops_every_host_naming_the_hosts(hosts, error):
    results = placed(hostvars_of(**hosts))
    for host in ("kvm1", "kvm2", "kvm3"):
        assert error in results[host]["errors"], results[host]["errors"]


def test_with_limit_a_domain_not_in_the_play_is_left_alone_unless_its_devices_are():
    hostvars = hostvars_of(kvm3=on("buildvm"))
    # kvm3 alone: buildvm is on none of the hosts of the play, and none of its devices is plugged into kvm3.
    alone = usb_fleet(hostvars, "kvm3", sorted(hostvars), ["kvm3"])
    assert (alone["errors"], alone["declaration"]) == ([], {"buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, {"host": "kvm2", "id": STICK_ID}], "exclusive": True}})
    hostvars["kvm3"]["ansible_facts"] = on()["ansible_facts"]
    left = usb_fleet(hostvars, "kvm3", sorted(hostvars), ["kvm3"])
    assert left["errors"] == [] and left["declaration"] == {}
    assert left["unplaced"] == ["usb_fleet domain buildvm is on none of the hosts of this play (looked at kvm3) and may be on kvm1 and kvm2, not in it; left alone."]
    # kvm1 alone: buildvm may be on kvm2 or kvm3, and kvm1 would take the export of its stick away.
    hostvars = hostvars_of(kvm3=on("buildvm"))
    refused = usb_fleet(hostvars, "kvm1", sorted(hostvars), ["kvm1"])
    assert refused["errors"] == [
        "usb_fleet domain buildvm is on none of the hosts of this play (looked at kvm1) and may be on kvm2 and kvm3, not in it: its devices on kvm1"
        " would lose their exports. Add the host it is defined on to the play (--limit)."
    ]


# usb_facts: where the domains are, alone


def test_usb_facts_domains_only_lists_the_domains_and_reads_no_usb_device(domains):
    name = domains.define("fleet-listed")
    result = run_module("usb_facts", {"domains_only": True})
    assert result["rc"] == 0, result
    assert list(result["ansible_facts"]) == ["usb_domain_states"]
    assert {"name": name, "state": "shutoff", "persistent": True} in result["ansible_facts"]["usb_domain_states"]
    full = run_module("usb_facts", {}, REFERENCE)
    assert {"name": name, "state": "shutoff", "persistent": True} in full["ansible_facts"]["usb_domain_states"]
    unreachable = run_module("usb_facts", {"domains_only": True, "uri": "qemu+unix:///system?socket=/nonexistent"})
    assert unreachable["rc"] != 0 and unreachable["msg"].startswith("Cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent")
