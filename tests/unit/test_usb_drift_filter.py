"""The kvmhost.usb.usb_drift filter on facts as usb_facts reports them: what probe.yml and report.yml show."""

from __future__ import annotations

import sys

import pytest

from tests.lib.modrun import collection_root

sys.path.insert(0, collection_root())

from ansible.errors import AnsibleFilterError  # noqa: E402

from ansible_collections.kvmhost.usb.plugins.filter.usb_drift import usb_drift  # noqa: E402

STICK = "46f4:0001:KING0001"
TWIN_A = "0627:0001:TWIN-A"
TWIN_B = "0627:0001:TWIN-B"
TABLET = "0627:0001@1-2"


def device(device_id, port, bus, number, serial=None, live=(), persistent=()):
    return {
        "id": device_id,
        "vendor_id": device_id[0:4],
        "product_id": device_id[5:9],
        "vendor_device_id": device_id[0:9],
        "serial": serial,
        "port": port,
        "bus": bus,
        "device": number,
        "address": "%03d:%03d" % (bus, number),
        "model": "model of " + device_id,
        "is_hub": False,
        "attached_to": {"live": list(live), "persistent": list(persistent)},
    }


def hostdev(vendor, product, bus=None, number=None, devices=(), stale=False):
    return {
        "vendor_id": vendor,
        "product_id": product,
        "bus": bus,
        "device": number,
        "address": "%03d:%03d" % (bus, number) if bus else None,
        "startup_policy": "optional",
        "devices": list(devices),
        "stale": stale,
    }


def domain(name, state="shutoff", hostdevs=(), intent=()):
    config = {"hostdevs": list(hostdevs), "intent": [{"id": device_id, "selector": {"id": device_id}} for device_id in intent]}
    return {"name": name, "state": state, "live": config if state == "running" else None, "persistent": config}


def facts(devices, domains):
    return {"usb_devices": devices, "usb_domains": domains, "usb_topology": []}


def test_converged_host_has_no_drift():
    result = usb_drift(
        facts(
            [device(STICK, "2-1", 2, 2, "KING0001", persistent=["vm1"]), device(TABLET, "1-2", 1, 3)],
            [domain("vm1", hostdevs=[hostdev("46f4", "0001", devices=[STICK])], intent=[STICK])],
        ),
        {"vm1": {"devices": [{"vendor_id": "46f4", "product_id": "0001"}], "exclusive": True}},
    )
    assert result["drift"] is False
    assert result["unclaimed"] == [TABLET]
    assert [(entry["id"], entry["declared_for"], entry["intended_for"], entry["flags"]) for entry in result["devices"]] == [
        (STICK, ["vm1"], ["vm1"], []),
        (TABLET, [], [], ["unclaimed"]),
    ]
    assert result["domains"] == [{"name": "vm1", "state": "shutoff", "declared": True, "exclusive": True, "holds": [STICK], "stale": []}]


def test_unplugged_device_is_missing_once_and_its_hostdev_is_stale():
    # TWIN-A was unplugged: the intent still names it, the pinned hostdev points at nothing.
    result = usb_drift(
        facts(
            [device(TWIN_B, "1-4", 1, 5, "TWIN-B")],
            [domain("vm1", state="running", hostdevs=[hostdev("0627", "0001", 1, 4, stale=True)], intent=[TWIN_A])],
        ),
        {"vm1": {"devices": [TWIN_A]}},
    )
    assert result["drift"] is True
    assert result["missing"] == [{"domain": "vm1", "device": TWIN_A, "source": "intent"}]
    assert result["stale"] == [
        {"domain": "vm1", "scope": "live", "address": "001:004", "vendor_device_id": "0627:0001"},
        {"domain": "vm1", "scope": "persistent", "address": "001:004", "vendor_device_id": "0627:0001"},
    ]
    assert result["domains"][0]["stale"] == ["001:004"]
    assert result["unclaimed"] == [TWIN_B]


def test_declared_but_never_converged_device_is_missing_from_the_inventory():
    result = usb_drift(facts([], [domain("vm1")]), {"vm1": {"devices": ["abcd:0001"]}})
    assert result["missing"] == [{"domain": "vm1", "device": "vendor_id=abcd, product_id=0001", "source": "inventory"}]


def test_device_held_by_another_domain_is_unattached_and_a_conflict():
    result = usb_drift(
        facts(
            [device(STICK, "2-1", 2, 2, "KING0001", persistent=["vm2"])],
            [domain("vm1"), domain("vm2", hostdevs=[hostdev("46f4", "0001", devices=[STICK])])],
        ),
        {"vm1": {"devices": ["2-1"]}},
    )
    assert result["unattached"] == [{"domain": "vm1", "device": STICK, "held_by": ["vm2"]}]
    assert result["devices"][0]["flags"] == ["conflict"]
    assert result["drift"] is True


def test_exclusive_domain_holding_an_undeclared_device_drifts_and_a_plain_one_does_not():
    held = [device(STICK, "2-1", 2, 2, "KING0001", persistent=["vm1"]), device(TWIN_A, "1-3", 1, 4, "TWIN-A", persistent=["vm1"])]
    domains = [domain("vm1", hostdevs=[hostdev("46f4", "0001", devices=[STICK]), hostdev("0627", "0001", 1, 4, devices=[TWIN_A])])]
    exclusive = usb_drift(facts(held, domains), {"vm1": {"devices": [STICK], "exclusive": True}})
    assert exclusive["undeclared"] == [{"domain": "vm1", "device": TWIN_A}]
    plain = usb_drift(facts(held, domains), {"vm1": {"devices": [STICK]}})
    assert plain["undeclared"] == [] and plain["drift"] is False


def test_ambiguous_and_malformed_selectors_and_unknown_domains_are_reported():
    twins = [device(TWIN_A, "1-3", 1, 4, "TWIN-A"), device(TWIN_B, "1-4", 1, 5, "TWIN-B")]
    result = usb_drift(facts(twins, []), {"ghost": {"devices": ["0627:0001", {"colour": "blue"}]}})
    assert result["unknown_domains"] == ["ghost"]
    assert result["invalid"][0] == {
        "domain": "ghost",
        "selector": "vendor_id=0627, product_id=0001",
        "error": "ambiguous: %s, %s match" % (TWIN_A, TWIN_B),
    }
    assert result["invalid"][1]["error"].startswith("Unknown selector field(s) colour")
    assert result["domains"] == [{"name": "ghost", "state": None, "declared": True, "exclusive": False, "holds": [], "stale": []}]


def test_tree_nodes_carry_holders_and_flags():
    stick = device(STICK, "2-1", 2, 2, "KING0001", live=["vm1"], persistent=["vm1"])
    tree = [{"id": "1d6b:0003@usb2", "port": "usb2", "is_hub": True, "children": [{"id": STICK, "port": "2-1", "is_hub": False, "children": []}]}]
    # The same host model as on the host: vm1 runs and holds the stick by its address.
    holder = domain("vm1", state="running", hostdevs=[hostdev("46f4", "0001", 2, 2, devices=[STICK])])
    result = usb_drift({"usb_devices": [stick], "usb_domains": [holder], "usb_topology": tree}, {})
    [root] = result["tree"]
    assert root["flags"] == [] and root["held_by"] == {"live": [], "persistent": []}
    assert root["children"][0]["held_by"] == {"live": ["vm1"], "persistent": ["vm1"]}
    assert root["children"][0]["address"] == "002:002"
    assert "held_by" not in tree[0]


def test_declared_state_must_be_a_mapping():
    with pytest.raises(AnsibleFilterError, match="must map domain names"):
        usb_drift(facts([], []), ["vm1"])
    with pytest.raises(AnsibleFilterError, match="settings of domain vm1 must be a mapping"):
        usb_drift(facts([], []), {"vm1": ["46f4:0001"]})


def test_intent_of_a_present_device_no_hostdev_holds_is_unattached_once():
    # After a replug the intent names TWIN-A, which is back at a new address, and nothing holds it.
    stale = domain("vm1", state="running", hostdevs=[hostdev("0627", "0001", 1, 4, stale=True)], intent=[TWIN_A])
    stale["live"] = dict(stale["live"], intent=[dict(stale["live"]["intent"][0], status="stale")])
    result = usb_drift(facts([device(TWIN_A, "1-3", 1, 9, "TWIN-A")], [stale]), {"vm1": {"devices": [TWIN_A]}})
    assert result["unattached"] == [{"domain": "vm1", "device": TWIN_A, "held_by": []}]
    assert result["devices"][0]["intended_for"] == ["vm1"]
    assert result["summary"]["drift"] == ["vm1: declares %s, held by nobody" % TWIN_A]
    assert result["summary"]["stale"][0] == "vm1 (live): hostdev 0627:0001 at 001:004, where no such device is"


def test_twin_with_the_same_serial_leaves_the_held_device_its_domain_and_flags_the_unstartable_domain():
    # vm1 was given TWIN-A (recorded by serial id, at 1-3, 001:004) when it was unique; then a second mouse with the
    # same serial arrived at 1-6, which turned both ids port-based, and the persistent hostdev by vendor:product now
    # designates both: the domain would not start as it is.
    held = device("0627:0001@1-3", "1-3", 1, 4, "TWIN-A")
    newcomer = device("0627:0001@1-6", "1-6", 1, 8, "TWIN-A")
    entry = {"id": TWIN_A, "selector": {"id": TWIN_A}, "serial": "TWIN-A", "port": "1-3", "address": "001:004"}
    vm1 = {"name": "vm1", "state": "shutoff", "live": None, "persistent": {"hostdevs": [hostdev("0627", "0001")], "intent": [entry]}}
    result = usb_drift(facts([held, newcomer], [vm1]), {"vm1": {"devices": [TWIN_A]}})
    assert result["missing"] == []
    assert [(item["id"], item["held_by"]["persistent"], item["intended_for"], item["declared_for"]) for item in result["devices"]] == [
        ("0627:0001@1-3", ["vm1"], ["vm1"], ["vm1"]),
        ("0627:0001@1-6", [], [], []),
    ]
    assert result["unclaimed"] == ["0627:0001@1-6"]
    assert result["unstartable"] == [{"domain": "vm1", "reason": "hostdev 0627:0001 designates 2 devices (0627:0001@1-3, 0627:0001@1-6)"}]
    assert result["summary"]["drift"] == ["vm1: could not start as it is: hostdev 0627:0001 designates 2 devices (0627:0001@1-3, 0627:0001@1-6)"]
    assert result["drift"] is True
