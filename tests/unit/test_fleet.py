"""usb_fleet, the declaration keyed by domain alone: usb_facts' domain listing, the usb_fleet filter on hostvars
dicts (several hosts, each with the domains it listed), the usb_exports filter reading its result, and the
passthrough role through ansible-playbook over an inventory of hosts that all connect locally, told apart by their
libvirt URIs (the run's own libvirtd for one, libvirt's test driver for the others, whose domains a file describes).

Two real hosts, with a device imported across, are in tests/integration/test_crosshost_testhost.py.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import yaml

from tests.lib import modrun
from tests.lib.domain_xml import hostdev, hostdevs, metadata
from tests.lib.modrun import run_module
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
    hosts = sorted(hostvars)
    kvm1 = usb_exports(hostvars, "kvm1", hosts, hosts)
    assert kvm1["conflicts"] == []
    assert kvm1["exports"] == [{"id": KINGSTON_ID, "importer": "kvm3", "importer_address": "10.77.0.3", "domain": "buildvm"}]
    assert usb_exports(hostvars, "kvm2", hosts, hosts)["exports"] == [
        {"id": STICK_ID, "importer": "kvm3", "importer_address": "10.77.0.3", "domain": "buildvm"}
    ]
    kvm3 = usb_exports(hostvars, "kvm3", hosts, hosts)
    assert kvm3["import_addresses"] == ["10.77.0.1", "10.77.0.2"]
    assert kvm3["declaration"] == placed(hostvars)["kvm3"]["declaration"]
    # Without the hosts of the play, usb_fleet is not read.
    assert usb_exports(hostvars, "kvm1", hosts)["exports"] == []


def test_a_fleet_device_on_the_host_the_domain_is_defined_on_is_not_exported():
    hostvars = hostvars_of(kvm1=on("buildvm"))
    hosts = sorted(hostvars)
    assert usb_exports(hostvars, "kvm1", hosts, hosts)["exports"] == []
    assert usb_exports(hostvars, "kvm2", hosts, hosts)["exports"] == [
        {"id": STICK_ID, "importer": "kvm1", "importer_address": "10.77.0.1", "domain": "buildvm"}
    ]


def test_a_mixed_fleet_keeps_each_hosts_usb_passthrough():
    own = {"testvm": {"devices": ["0627:0001:42"]}}
    results = placed(hostvars_of(kvm2=dict(on("buildvm", "testvm"), usb_passthrough=own), kvm3={"usb_passthrough": {"other": {}}}))
    assert results["kvm2"]["errors"] == []
    assert results["kvm2"]["declaration"] == {
        "testvm": own["testvm"],
        "buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, {"id": STICK_ID}], "exclusive": True},
    }
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
    assert (alone["errors"], alone["declaration"]) == ([], FLEET)
    hostvars["kvm3"]["ansible_facts"] = on()["ansible_facts"]
    left = usb_fleet(hostvars, "kvm3", sorted(hostvars), ["kvm3"])
    assert left["errors"] == [] and left["declaration"] == {}
    assert left["unplaced"] == [
        "usb_fleet domain buildvm is on none of the hosts of this play (looked at kvm3) and may be on kvm1 and kvm2, not in it; left alone."
    ]
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


# The passthrough role, through ansible-playbook

TABLET_ID = "0627:0001:42"
# kvm2's libvirt: the test driver, with the domains a file of the test describes (running).
NODE_XML = "<node>%s</node>"
TEST_DOMAIN_XML = "<domain type='test'><name>%s</name><memory>65536</memory><os><type>hvm</type></os></domain>"


def driver_uri(tmp_path, *names):
    node = tmp_path / "kvm2-libvirt.xml"
    node.write_text(NODE_XML % "".join(TEST_DOMAIN_XML % name for name in names))
    return "test://%s" % node


def converge(tmp_path, hosts, fleet, *options, env=None):
    """The passthrough role on every host of ``hosts`` (name to host vars), with ``fleet`` as usb_fleet in the
    inventory's group_vars/all.yml, under umockdev with the reference tree."""
    (tmp_path / "group_vars").mkdir(exist_ok=True)
    (tmp_path / "group_vars" / "all.yml").write_text(yaml.safe_dump({"usb_fleet": fleet}))
    play = tmp_path / "play.yml"
    play.write_text(yaml.safe_dump([{"name": "fleet", "hosts": "all", "gather_facts": False, "roles": ["kvmhost.usb.passthrough"]}]))
    return modrun.run_playbook(tmp_path, hosts, play, *options, devices=REFERENCE, env=env)


def reported(process, host, task="kvmhost.usb.passthrough : Report what changed"):
    """What a debug task printed for ``host``: by default the passthrough role's "Report what changed"."""
    block = process.stdout.split("TASK [%s]" % task, 1)[1]
    body = block.split("ok: [%s] => " % host, 1)[1].split("\n}\n", 1)[0] + "\n}"
    return yaml.safe_load(body)["msg"]


def fatal_hosts(process):
    return sorted(re.findall(r"^fatal: \[(\w+)\]", process.stdout, re.M))


def test_role_converges_a_fleet_domain_on_the_host_it_is_defined_on_beside_a_per_host_domain(tmp_path, domains):
    fleet_domain = domains.define("fleet-here")
    own_domain = domains.define("fleet-own")
    hosts = {
        "kvm1": dict(CLEAR, usb_link_address="10.77.0.1", usb_passthrough={own_domain: {"devices": [TABLET_ID]}}),
        "kvm2": dict(CLEAR, usb_link_address="10.77.0.2", usb_passthrough_uri=driver_uri(tmp_path, "kvmhost-usb-test-elsewhere")),
    }
    fleet = {fleet_domain: {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, {"host": "kvm2", "id": TABLET_ID}], "controller": "qemu-xhci"}}
    exports = tmp_path / "exports.json"
    before = domains.snapshot()
    checked = converge(tmp_path, hosts, fleet, "--check", env={"KVMHOST_USB_EXPORTS": str(exports)})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    changes = reported(checked, "kvm1")
    assert sorted(changes) == sorted([fleet_domain, own_domain])
    # The Kingston stick of kvm1 is attached as a local device, the tablet of kvm2 imported first.
    assert changes[fleet_domain][0] == "would import id=%s from kvm2 (10.77.0.2)" % TABLET_ID
    assert '<vendor id="0x0951" /><product id="0x1666" />' in changes[fleet_domain][1]
    assert changes[fleet_domain][-1] == "record the intent of %s (persistent): %s, %s" % (fleet_domain, KINGSTON_ID, TABLET_ID)
    # The fleet domain's device on kvm2 is exported by kvm2, for kvm1, where the domain is.
    assert reported(checked, "kvm2") == {"exports to other hosts": ["export %s to kvm1 (10.77.0.1) for %s" % (TABLET_ID, fleet_domain)]}
    assert not exports.exists()
    assert domains.snapshot() == before

    # Its device on kvm1 alone: kvm1 attaches it as a local device (no host in the intent), and nothing is exported.
    fleet[fleet_domain]["devices"] = [{"host": "kvm1", "id": KINGSTON_ID}]
    done = converge(tmp_path, hosts, fleet, env={"KVMHOST_USB_EXPORTS": str(exports)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not exports.exists()
    assert hostdevs(domains.inactive(fleet_domain)) == [hostdev("0951", "1666")]
    assert 'host="' not in metadata(domains.inactive(fleet_domain))
    assert hostdevs(domains.inactive(own_domain)) == [hostdev("0627", "0001")]
    assert reported(done, "kvm2") == "Every declared domain holds its declared devices: nothing to change."
    again = converge(tmp_path, hosts, fleet, env={"KVMHOST_USB_EXPORTS": str(exports)})
    assert again.returncode == 0, again.stdout
    assert [again.recap[host]["changed"] for host in ("kvm1", "kvm2")] == [0, 0], again.stdout


@pytest.mark.parametrize(
    "case",
    ["defined on two hosts", "declared twice", "not in the play"],
)
def test_role_refuses_a_fleet_that_contradicts_itself_on_every_host_before_anything_changes(tmp_path, domains, case):
    name = domains.define("fleet-bad")
    fleet = {name: {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}
    hosts = {"kvm1": dict(CLEAR), "kvm2": dict(CLEAR, usb_passthrough_uri=driver_uri(tmp_path, name))}
    options = []
    expected = ["kvm1", "kvm2"]
    if case == "defined on two hosts":
        message = "usb_fleet domain %s is defined on kvm1 (shutoff) and kvm2 (running)" % name
    elif case == "declared twice":
        hosts["kvm2"] = dict(CLEAR, usb_passthrough={name: {"devices": [TABLET_ID]}})
        message = "Domain %s is declared in usb_fleet and in usb_passthrough of kvm2; declare it in one of them." % name
    else:
        # --limit kvm1 with the domain on kvm2 (the test driver's): kvm1 would drop the export of its Kingston stick.
        hosts["kvm1"]["usb_passthrough_uri"] = driver_uri(tmp_path)
        options = ["--limit", "kvm1"]
        expected = ["kvm1"]
        message = "usb_fleet domain %s is on none of the hosts of this play (looked at kvm1) and may be on kvm2, not in it: its devices on kvm1" % name
    before = domains.snapshot()
    process = converge(tmp_path, hosts, fleet, *options, env={"KVMHOST_USB_EXPORTS": str(tmp_path / "exports.json")})
    assert process.returncode != 0
    assert fatal_hosts(process) == expected, process.stdout + process.stderr
    assert message in process.stdout, process.stdout
    assert "TASK [kvmhost.usb.passthrough : Compute the USB devices this host exports" not in process.stdout
    assert domains.snapshot() == before


def test_probe_compares_a_fleet_domain_with_the_host_it_is_defined_on(tmp_path, domains):
    name = domains.define("fleet-probed")
    hosts = {"kvm1": dict(CLEAR), "kvm2": dict(CLEAR, usb_passthrough_uri=driver_uri(tmp_path))}
    (tmp_path / "group_vars").mkdir()
    (tmp_path / "group_vars" / "all.yml").write_text(yaml.safe_dump({"usb_fleet": {name: {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}}))
    before = domains.snapshot()
    probe = modrun.run_playbook(tmp_path, hosts, os.path.join(modrun.REPO, "playbooks", "probe.yml"), devices=REFERENCE)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    drift = dict((host, reported(probe, host, "Show the probe")["drift"]) for host in ("kvm1", "kvm2"))
    assert "%s: declares %s, held by nobody" % (name, KINGSTON_ID) in drift["kvm1"]
    assert not [line for line in drift["kvm2"] if name in line]
    assert domains.snapshot() == before
