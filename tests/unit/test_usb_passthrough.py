"""usb_passthrough, a host's whole declared state in one call, against the real local libvirtd with USB trees
described to umockdev.

This machine has no USB: stopped domains take persistent changes, and a live attach to a running domain is
refused by libvirt ("cannot open directory '/sys/bus/usb/devices'"), which is the refusal in the middle of a
pass. Swaps between running guests are on the test host (tests/integration/test_passthrough_testhost.py).
"""

from __future__ import annotations

import json
import os

import libvirt
import pytest

from tests.lib import bigtree
from tests.lib.domain_xml import hostdev, hostdevs, intent, metadata
from tests.lib.domains import LIBVIRT_DIR
from tests.lib.inotify import Writes
from tests.lib.modrun import attach, failed, run_module
from tests.lib.trees import KINGSTON, KINGSTON_ID, REFERENCE, TWINS, hid

STICK = KINGSTON_ID
TABLET = "0627:0001:42"
TWIN = "0627:0001:43"
SELECTORS = {STICK: {"id": STICK}, TABLET: {"id": TABLET}, TWIN: {"id": TWIN}}
# The persistent hostdev usb_attach writes for each: the stick is unique, the tablets are pinned to their address.
HOSTDEVS = {STICK: hostdev("0951", "1666"), TABLET: hostdev("0627", "0001", 1, 2), TWIN: hostdev("0627", "0001", 1, 3)}


def converge(declared, devices=TWINS, **options):
    args = dict(options.pop("args", {}), domains=declared)
    return run_module("usb_passthrough", args, devices, **options)


def ours(items, *names):
    """The drift entries about these domains (the local libvirtd may hold other tests' domains)."""
    return [item for item in items if item["domain"] in names]


def holding(domains, name, *device_ids):
    """The domain's persistent XML holds exactly these devices: their hostdevs and their intent."""
    xml = domains.inactive(name)
    assert sorted(hostdevs(xml)) == sorted(HOSTDEVS[device_id] for device_id in device_ids), xml
    recorded = metadata(xml)
    for device_id in device_ids:
        assert 'id="%s"' % device_id in recorded, xml
    assert recorded is None or recorded.count("<kvmhost-usb:device ") == len(device_ids), xml


def given(domains, assignment):
    """Define a stopped domain per name and give it its devices with usb_attach."""
    names = {}
    for suffix, device_ids in assignment.items():
        names[suffix] = domains.define("pt-" + suffix)
        if device_ids:
            assert attach({"domain": names[suffix], "devices": list(device_ids)}, TWINS)["rc"] == 0
    return names


def test_swap_between_declared_domains_needs_no_steal_and_a_rerun_changes_nothing(domains):
    names = given(domains, {"g1": [STICK], "g2": [TABLET]})
    declared = {names["g1"]: {"devices": [TABLET]}, names["g2"]: {"devices": [STICK]}}
    result = converge(declared)
    assert result["rc"] == 0, result
    assert result["changed"] is True
    holding(domains, names["g1"], TABLET)
    holding(domains, names["g2"], STICK)
    kinds = [action.split(" (")[0] for action in result["actions"]]
    # Every departure before any arrival, then the intent.
    assert sorted(kinds[0:2]) == ["detach from %s" % names["g1"], "detach from %s" % names["g2"]]
    assert sorted(kinds[2:4]) == ["attach to %s" % names["g1"], "attach to %s" % names["g2"]]
    assert sorted(kinds[4:]) == ["record the intent of %s" % names["g1"], "record the intent of %s" % names["g2"]]
    assert result["domains"][names["g1"]]["devices"] == [TABLET]
    assert all(names["g1"] in action for action in result["domains"][names["g1"]]["actions"])
    before = domains.snapshot()
    again = converge(declared)
    assert again["rc"] == 0, again
    assert again["changed"] is False and again["actions"] == []
    assert [ours(again["drift"][key], *declared) for key in ("missing", "unattached", "undeclared", "stale", "unstartable")] == [[]] * 5
    assert domains.snapshot() == before


def test_three_way_rotation(domains):
    names = given(domains, {"r1": [STICK], "r2": [TABLET], "r3": [TWIN]})
    declared = {names["r1"]: {"devices": [TABLET]}, names["r2"]: {"devices": [TWIN]}, names["r3"]: {"devices": [STICK]}}
    result = converge(declared)
    assert result["rc"] == 0, result
    holding(domains, names["r1"], TABLET)
    holding(domains, names["r2"], TWIN)
    holding(domains, names["r3"], STICK)
    assert converge(declared)["changed"] is False


def test_the_order_of_the_declaration_does_not_matter(domains):
    names = given(domains, {"o1": [STICK], "o2": [TABLET]})
    declared = {names["o2"]: {"devices": [STICK]}, names["o1"]: {"devices": [TABLET]}}
    assert converge(declared)["rc"] == 0
    holding(domains, names["o1"], TABLET)
    holding(domains, names["o2"], STICK)


def test_move_from_an_undeclared_holder_needs_steal(domains):
    names = given(domains, {"holder": [STICK], "taker": []})
    declared = {names["taker"]: {"devices": [STICK]}}
    before = domains.snapshot()
    message = failed(converge(declared), "is held by domain %s (persistent)" % names["holder"], "set steal: true to move it to %s" % names["taker"])
    assert STICK in message
    assert domains.snapshot() == before
    per_domain = converge({names["taker"]: {"devices": [STICK], "steal": True}}, check_mode=True)
    assert per_domain["rc"] == 0 and per_domain["changed"] is True, per_domain
    result = converge(declared, args={"steal": True})
    assert result["rc"] == 0, result
    holding(domains, names["holder"])
    holding(domains, names["taker"], STICK)


def test_one_device_declared_for_two_domains_fails_before_anything_changes(domains):
    names = given(domains, {"d1": [STICK], "d2": []})
    before = domains.snapshot()
    failed(
        converge({names["d1"]: {"devices": [TABLET]}, names["d2"]: {"devices": [TABLET]}}),
        "Device %s is declared for both %s and %s" % (TABLET, names["d1"], names["d2"]),
    )
    # Two different selectors that resolve to one device.
    failed(
        converge({names["d1"]: {"devices": ["0951:1666"]}, names["d2"]: {"devices": ["2-1"]}}),
        "Device %s is declared for both %s and %s" % (STICK, names["d1"], names["d2"]),
    )
    assert domains.snapshot() == before


@pytest.mark.parametrize(
    "selector, fragments",
    [
        ({"vendor_id": "09x1", "product_id": "1666"}, ["Malformed vendor_id '09x1'"]),
        ("0627:0001", ["is ambiguous: 2 devices match", "Add 'serial' to the selector"]),
        ({"vendor_id": "abcd", "product_id": "0001"}, ["No USB device matches (vendor_id=abcd, product_id=0001)"]),
    ],
)
def test_a_bad_selector_fails_the_whole_pass_naming_its_domain(domains, selector, fragments):
    names = given(domains, {"good": [STICK], "bad": []})
    before = domains.snapshot()
    result = converge({names["good"]: {"devices": [TABLET]}, names["bad"]: {"devices": [selector]}})
    failed(result, "Domain %s: " % names["bad"], *fragments)
    assert domains.snapshot() == before


def test_an_unknown_declared_domain_fails_naming_it_and_the_drift_is_still_reported(domains):
    names = given(domains, {"real": []})
    before = domains.snapshot()
    result = converge({names["real"]: {"devices": [STICK]}, "kvmhost-usb-test-pt-ghost": {"devices": [TABLET]}})
    failed(result, "Unknown domain 'kvmhost-usb-test-pt-ghost'", names["real"])
    assert result["drift"]["unknown_domains"] == ["kvmhost-usb-test-pt-ghost"]
    assert domains.snapshot() == before


def test_misspelt_setting_fails_naming_the_domain(domains):
    names = given(domains, {"typo": []})
    failed(converge({names["typo"]: {"device": [STICK]}}), "Domain %s: unknown setting(s) device" % names["typo"])


def test_whole_host_takes_everything_from_undeclared_domains(domains):
    names = given(domains, {"kept": [STICK], "other": [TABLET, TWIN]})
    result = converge({names["kept"]: {"devices": [STICK]}}, args={"whole_host": True}, check_mode=True)
    assert result["rc"] == 0 and result["changed"] is True, result
    assert set(name for name in result["domains"] if name.startswith("kvmhost-usb-test-pt-")) == {names["kept"], names["other"]}
    result = converge({names["kept"]: {"devices": [STICK]}}, args={"whole_host": True})
    assert result["rc"] == 0, result
    holding(domains, names["kept"], STICK)
    holding(domains, names["other"])
    # Without whole_host an undeclared domain is left alone.
    assert attach({"domain": names["other"], "devices": [TWIN]}, TWINS)["rc"] == 0
    assert converge({names["kept"]: {"devices": [STICK]}})["changed"] is False
    holding(domains, names["other"], TWIN)


def test_whole_host_makes_declared_domains_exclusive(domains):
    names = given(domains, {"excl": [STICK, TABLET]})
    assert converge({names["excl"]: {"devices": [STICK]}})["changed"] is False
    result = converge({names["excl"]: {"devices": [STICK]}}, args={"whole_host": True})
    assert result["rc"] == 0 and result["changed"] is True, result
    holding(domains, names["excl"], STICK)


def test_check_mode_changes_no_byte_of_any_domain_and_is_the_probe(domains):
    names = given(domains, {"c1": [STICK], "c2": [TABLET], "c3": []})
    declared = {names["c1"]: {"devices": [TABLET]}, names["c2"]: {"devices": [STICK]}, names["c3"]: {"devices": [TWIN]}}
    before = domains.snapshot()
    checked = converge(declared, check_mode=True, diff=True)
    assert checked["rc"] == 0, checked
    assert checked["changed"] is True
    assert domains.snapshot() == before
    assert checked["drift"]["drift"] is True
    assert {item["domain"]: item["device"] for item in ours(checked["drift"]["unattached"], *declared)} == {
        names["c1"]: TABLET,
        names["c2"]: STICK,
        names["c3"]: TWIN,
    }
    done = converge(declared, diff=True)
    assert done["actions"] == checked["actions"]
    assert done["diff"] == checked["diff"]


def test_a_stopped_domain_is_defined_once_per_converge_and_keeps_its_secrets_and_other_metadata(domains):
    names = given(domains, {"w1": [STICK], "w2": [TABLET]})
    # A VNC password (only in the definition read with its secrets) and another tool's metadata, beside ours.
    w1 = domains.lookup(names["w1"])
    xml = w1.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("</devices>", "<graphics type='vnc' passwd='s3cretvn'/></devices>")
    domains.conn.defineXML(xml)
    domains.lookup(names["w1"]).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, "<note>kept</note>", "other", "http://example.org/other/1", libvirt.VIR_DOMAIN_AFFECT_CONFIG
    )
    declared = {names["w1"]: {"devices": [TABLET]}, names["w2"]: {"devices": [STICK]}}
    with Writes(os.path.join(LIBVIRT_DIR, "etc", "qemu")) as writes:
        result = converge(declared)
    assert result["rc"] == 0, result
    # Each domain: a detach, an attach and its intent, written with one define.
    assert len(result["actions"]) == 6, result["actions"]
    assert (writes.count(names["w1"] + ".xml"), writes.count(names["w2"] + ".xml")) == (1, 1), writes.counts
    holding(domains, names["w1"], TABLET)
    holding(domains, names["w2"], STICK)
    secure = domains.lookup(names["w1"]).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    assert "passwd='s3cretvn'" in secure, secure
    other = domains.lookup(names["w1"]).metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, "http://example.org/other/1", libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert other == "<note>kept</note>", other


def test_refusal_of_a_live_step_comes_before_any_stopped_domain_is_written(domains):
    names = given(domains, {"u1": [STICK], "u2": [TABLET]})
    running = domains.define("pt-running")
    domains.lookup(running).create()
    declared = {names["u1"]: {"devices": [TABLET]}, names["u2"]: {"devices": [STICK]}, running: {"devices": [TWIN]}}
    before = domains.snapshot()
    result = converge(declared)
    message = failed(result, "libvirt refused to attach to %s (live)" % running, "/sys/bus/usb/devices")
    # The stopped domains' swap is written with one define each, after every live step: nothing to undo.
    assert message.endswith("Nothing was changed."), message
    assert domains.snapshot() == before


def test_absent_device_named_by_its_full_id_is_recorded_with_a_warning(domains):
    names = given(domains, {"later": []})
    dongle = "0529:0001:1A2B3C"
    result = converge({names["later"]: {"devices": [dongle]}})
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert any("%s declared for %s is not plugged in" % (dongle, names["later"]) in warning for warning in result["warnings"])
    xml = domains.inactive(names["later"])
    assert hostdevs(xml) == []
    assert metadata(xml) == intent((dongle, {"id": dongle}, {"serial": "1A2B3C"}))
    assert ours(result["drift"]["missing"], names["later"]) == [{"domain": names["later"], "device": "id=%s" % dongle, "source": "inventory"}]
    again = converge({names["later"]: {"devices": [dongle]}})
    assert again["changed"] is False
    assert ours(again["drift"]["missing"], names["later"]) == [{"domain": names["later"], "device": dongle, "source": "intent"}]
    # A vague selector of an absent device is still an error.
    failed(converge({names["later"]: {"devices": ["0529:0001"]}}), "No USB device matches (vendor_id=0529, product_id=0001)")


def test_a_twin_with_the_same_serial_never_takes_the_held_devices_place(domains):
    # The domain was given the tablet 42 while it was unique; a second tablet with serial 42 arrives at 1-2, which turns
    # both ids port-based. The domain keeps its own tablet (found at the address it was bound at), its persistent
    # hostdev is pinned to that address so that the domain still starts, and the facts say attached.
    names = given(domains, {"id": []})
    name = names["id"]
    assert attach({"domain": name, "devices": [TABLET]}, REFERENCE)["rc"] == 0
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001")]
    clash = REFERENCE + [hid("1-2", 3, serial="42")]
    facts = run_module("usb_facts", {}, clash)["ansible_facts"]
    assert [device["id"] for device in facts["usb_devices"] if device["vendor_id"] == "0627"] == ["0627:0001@1-1", "0627:0001@1-2"]
    [before] = [domain for domain in facts["usb_domains"] if domain["name"] == name]
    assert [entry["status"] for entry in before["persistent"]["intent"]] == ["attached"]
    checked = converge({name: {"devices": [TABLET]}}, clash, check_mode=True)
    assert ours(checked["drift"]["unstartable"], name) == [
        {"domain": name, "reason": "hostdev 0627:0001 designates 2 devices (0627:0001@1-1, 0627:0001@1-2)"}
    ]
    result = converge({name: {"devices": [TABLET]}}, clash)
    assert result["rc"] == 0, result
    # Its own tablet, at 1-1, by the id the rule gives it now.
    assert result["domains"][name]["devices"] == ["0627:0001@1-1"]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 2)]
    # The entry keeps the id it was declared by, and the address it is bound at.
    assert metadata(xml) == intent((TABLET, {"id": TABLET}, {"serial": "42", "port": "1-1", "address": "001:002"}))
    facts = run_module("usb_facts", {}, clash)["ansible_facts"]
    [after] = [domain for domain in facts["usb_domains"] if domain["name"] == name]
    assert [entry["status"] for entry in after["persistent"]["intent"]] == ["attached"]
    assert converge({name: {"devices": [TABLET]}}, clash)["changed"] is False
    # usb_attach with the recorded id finds the same device, and the newcomer is free for another domain.
    assert attach({"domain": name, "devices": [TABLET]}, clash)["changed"] is False
    other = domains.define("pt-id-other")
    assert attach({"domain": other, "devices": ["0627:0001@1-2"]}, clash)["rc"] == 0
    failed(attach({"domain": other, "devices": ["0627:0001@1-1"]}, clash), "held by domain %s" % name)


def test_an_undeclared_domain_is_left_alone_but_for_a_hostdev_a_twin_made_ambiguous(domains):
    names = given(domains, {"aside": [], "declared": []})
    assert attach({"domain": names["aside"], "devices": [STICK]}, REFERENCE)["rc"] == 0
    declared = {names["declared"]: {"devices": [TABLET]}}
    assert converge(declared, REFERENCE)["rc"] == 0
    before = domains.inactive(names["aside"])
    assert converge(declared, REFERENCE)["changed"] is False
    assert domains.inactive(names["aside"]) == before
    # A second stick with the same serial at 2-2: the vendor:product hostdev would designate both.
    clash = REFERENCE + [dict(KINGSTON, port="2-2", devnum=5)]
    result = converge(declared, clash)
    assert result["rc"] == 0, result
    assert ours(result["drift"]["unstartable"], names["aside"]) == [
        {"domain": names["aside"], "reason": "hostdev 0951:1666 designates 2 devices (0951:1666@2-1, 0951:1666@2-2)"}
    ]
    # Its intent already records the address the stick has: only the hostdev changes.
    assert [action.split(":")[0] for action in result["domains"][names["aside"]]["actions"]] == [
        "detach from %s (persistent)" % names["aside"],
        "attach to %s (persistent)" % names["aside"],
    ]
    assert hostdevs(domains.inactive(names["aside"])) == [hostdev("0951", "1666", 2, 2)]
    again = converge(declared, clash)
    assert again["changed"] is False and ours(again["drift"]["unstartable"], names["aside"]) == []


def test_at_200_devices_the_result_says_how_the_host_differs_not_all_it_has_and_the_diff_only_for_diff(domains):
    devices = bigtree.fleet_host(200)
    name = domains.define("pt-200")
    leaf = next(device for device in devices if device.get("serial") and device.get("device_class", "00") != "09" and "." in device["port"])
    declared = {name: {"devices": [{"port": leaf["port"]}]}}
    done = converge(declared, devices)
    assert done["rc"] == 0 and done["changed"], done
    assert "diff" not in done
    # The drift lists what differs; the 200 devices themselves are usb_facts' to report.
    assert not {"devices", "tree"} & set(done["drift"]) and "present" not in done["drift"]["summary"]
    assert len(json.dumps(done["drift"])) < 10000, len(json.dumps(done["drift"]))
    again = converge(declared, devices, diff=True, check_mode=True)
    assert again["changed"] is False and again["diff"]["before"] == again["diff"]["after"]
    # Dropped from the declaration with --diff: the diff shows the hostdev going.
    dropped = converge({name: {"devices": []}}, devices, diff=True, args={"whole_host": False})
    assert name in dropped["diff"]["before"] and "hostdev" in dropped["diff"]["before"]
