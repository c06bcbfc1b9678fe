"""usb_detach against the real local libvirtd, with USB trees described to umockdev."""

from __future__ import annotations

import pytest

from tests.lib.domain_xml import hostdev, hostdevs, intent, metadata, source_xml
from tests.lib.modrun import attach, detach, failed, without_library
from tests.lib.trees import KINGSTON, KINGSTON_ID, REFERENCE, TWINS


def attached(domains, suffix, selectors, tree=tuple(REFERENCE)):
    name = domains.define(suffix)
    result = attach({"domain": name, "devices": selectors}, tree)
    assert result["rc"] == 0 and result["changed"], result
    return name


def test_detach_removes_hostdev_and_intent(domains):
    name = attached(domains, "detach", ["0951:1666"])
    result = detach({"domain": name, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert result["actions"] == [
        'detach from %s (persistent): <hostdev mode="subsystem" type="usb"><source startupPolicy="optional">'
        '<vendor id="0x0951" /><product id="0x1666" /></source></hostdev>' % name,
        "record the intent of %s (persistent): none" % name,
    ]
    assert result["domain"] == {"name": name, "uuid": domains.lookup(name).UUIDString(), "state": "shutoff"}
    assert result["domains"] == [result["domain"]]
    assert result["devices"][0]["id"] == KINGSTON_ID
    assert result["devices"][0]["attached_to"] == {"live": [], "persistent": []}
    xml = domains.inactive(name)
    assert hostdevs(xml) == []
    assert metadata(xml) is None


def test_detaching_what_is_not_attached_changes_nothing(domains):
    name = domains.define("not-attached")
    before = domains.inactive(name)
    result = detach({"domain": name, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["changed"] is False
    assert result["actions"] == []
    assert result["domains"] == []
    assert domains.inactive(name) == before
    again = detach({"devices": ["0951:1666"]})
    assert again["rc"] == 0 and again["changed"] is False, again


def test_second_detach_is_idempotent(domains):
    name = attached(domains, "twice", ["0951:1666"])
    assert detach({"domain": name, "devices": ["0951:1666"]})["changed"] is True
    before = domains.inactive(name)
    assert detach({"domain": name, "devices": ["0951:1666"]})["changed"] is False
    assert domains.inactive(name) == before


def test_detach_keeps_the_other_devices(domains):
    name = attached(domains, "keep", ["0627:0001:42", "0627:0001:43", "0951:1666"], TWINS)
    result = detach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)
    assert result["rc"] == 0, result
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 3, port=2), hostdev("0951", "1666", port=3)]
    assert metadata(xml) == intent(("0627:0001:43", {"id": "0627:0001:43"}), (KINGSTON_ID, {"vendor_id": "0951", "product_id": "1666"}))


def test_detach_of_one_twin_leaves_the_other_twins_replugged_hostdev(domains):
    # Tablet 43 was replugged (device 3 became device 9): its pinned hostdev designates nothing now, and
    # stands for tablet 43 only, not for tablet 42 beside it; the agent re-binds it.
    name = attached(domains, "twin-replugged", ["0627:0001:42", "0627:0001:43"], TWINS)
    replugged = [dict(device, devnum=9) if device.get("serial") == "43" else device for device in TWINS]
    result = detach({"domain": name, "devices": ["0627:0001:42"]}, replugged)
    assert result["rc"] == 0, result
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 3, port=2)]
    assert metadata(xml) == intent(("0627:0001:43", {"id": "0627:0001:43"}))


def test_detach_from_whoever_holds_each_device(domains):
    first = attached(domains, "holds-stick", ["0951:1666"])
    second = attached(domains, "holds-tablet", ["0627:0001:43"], TWINS)
    bystander = attached(domains, "bystander", ["0627:0001:42"], TWINS)
    bystander_before = domains.inactive(bystander)
    result = detach({"devices": ["0951:1666", {"serial": "43"}]}, TWINS)
    assert result["rc"] == 0, result
    assert result["domain"] is None
    assert [domain["name"] for domain in result["domains"]] == [first, second]
    for name in (first, second):
        assert hostdevs(domains.inactive(name)) == []
        assert metadata(domains.inactive(name)) is None
    assert domains.inactive(bystander) == bystander_before


def test_detach_from_a_domain_that_does_not_hold_it_leaves_the_holder(domains):
    holder = attached(domains, "holder", ["0951:1666"])
    other = domains.define("other")
    before = domains.snapshot()
    result = detach({"domain": other, "devices": ["0951:1666"]})
    assert result["rc"] == 0 and result["changed"] is False, result
    assert result["devices"][0]["attached_to"] == {"live": [], "persistent": [holder]}
    assert domains.snapshot() == before


def test_hand_written_hostdev_is_detached(domains):
    name = domains.define("byhand", [source_xml("0951", "1666", 2, 2)])
    result = detach({"devices": ["0951:1666"]})
    assert result["rc"] == 0 and result["changed"] is True, result
    assert hostdevs(domains.inactive(name)) == []


def test_check_mode_changes_nothing_and_predicts_the_diff(domains):
    name = attached(domains, "check", ["0951:1666"])
    before = domains.inactive(name)
    checked = detach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, diff=True)
    assert checked["rc"] == 0, checked
    assert checked["changed"] is True
    assert domains.inactive(name) == before
    assert checked["diff"]["after"] == "%s (persistent configuration):\n" % name
    assert checked["diff"]["before"].startswith("%s (persistent configuration):\n  <hostdev" % name)
    done = detach({"domain": name, "devices": ["0951:1666"]}, diff=True)
    assert done["diff"] == checked["diff"]
    assert done["actions"] == checked["actions"]


def test_unplugged_device_named_by_the_intent_is_detached(domains):
    name = attached(domains, "unplugged", ["0627:0001:42"], TWINS)
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 2)]
    without_42 = [device for device in TWINS if device.get("serial") != "42"]
    result = detach({"devices": ["0627:0001:42"]}, without_42)
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert result["devices"] == []
    assert [domain["name"] for domain in result["domains"]] == [name]
    assert hostdevs(domains.inactive(name)) == []
    assert metadata(domains.inactive(name)) is None


def test_detach_with_auto_start_starts_the_domain(domains):
    name = attached(domains, "autostart", ["0951:1666"])
    result = detach({"domain": name, "devices": ["0951:1666"], "auto_start": True}, check_mode=True)
    assert result["actions"][-1] == "start %s" % name
    assert not domains.lookup(name).isActive()
    result = detach({"domain": name, "devices": ["0951:1666"], "auto_start": True})
    assert result["rc"] == 0, result
    assert result["domain"]["state"] == "running"
    assert domains.lookup(name).isActive()
    assert hostdevs(domains.inactive(name)) == []


# Errors: each one leaves every domain as it was.


@pytest.mark.parametrize(
    "selector, fragment",
    [
        ({"vendor_id": "951", "product_id": "1666"}, "Malformed vendor_id '951'"),
        ({"address": "002-005"}, "Malformed address '002-005'"),
        ({"port": "usb2"}, "Malformed port 'usb2'"),
    ],
)
def test_malformed_selector(domains, selector, fragment):
    attached(domains, "malformed", ["0951:1666"])
    before = domains.snapshot()
    failed(detach({"devices": [selector]}), fragment)
    assert domains.snapshot() == before


def test_unknown_device(domains):
    attached(domains, "unknown-device", ["0951:1666"])
    before = domains.snapshot()
    failed(
        detach({"devices": [{"vendor_id": "0951", "product_id": "1666", "serial": "NOPE"}]}),
        "No USB device matches",
        "Present with 0951:1666: %s" % KINGSTON_ID,
    )
    assert domains.snapshot() == before


def test_ambiguous_selector(domains):
    attached(domains, "ambiguous", ["0627:0001:42"], TWINS)
    before = domains.snapshot()
    failed(detach({"devices": ["0627:0001"]}, TWINS), "is ambiguous", "Add 'serial' to the selector")
    assert domains.snapshot() == before


def test_unknown_domain(domains):
    attached(domains, "known", ["0951:1666"])
    before = domains.snapshot()
    failed(detach({"domain": "kvmhost-usb-test-nowhere", "devices": ["0951:1666"]}), "Unknown domain 'kvmhost-usb-test-nowhere'")
    assert domains.snapshot() == before


def test_libvirt_unreachable(domains):
    failed(detach({"devices": ["0951:1666"], "uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"}), "Cannot connect to libvirt")


@pytest.mark.parametrize("library, package", [("libvirt", "libvirt-python"), ("pyudev", "pyudev")])
def test_missing_library_on_the_target_names_the_package(tmp_path, library, package):
    failed(detach({"devices": ["0951:1666"]}, env=without_library(tmp_path, library)), "(%s" % package, "python3-%s" % library)


def test_selectors_are_required_as_a_list(domains):
    failed(detach({"devices": []}), "No devices given")


def test_live_intent_is_removed_from_a_running_domain(domains):
    name = domains.define("running")
    domains.lookup(name).create()
    domains.set_intent(name, '<passthrough><device id="%s"><selector vendor_id="0951" product_id="1666"/></device></passthrough>' % KINGSTON_ID, live=True)
    result = detach({"devices": [{"serial": KINGSTON["serial"]}]})
    assert result["rc"] == 0 and result["changed"] is True, result
    assert result["actions"] == ["record the intent of %s (live): none" % name]
    assert metadata(domains.live(name)) is None
