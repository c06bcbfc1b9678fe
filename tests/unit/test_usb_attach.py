"""usb_attach against the real local libvirtd, with USB trees described to umockdev.

This machine has no USB: persistent-configuration changes of defined (stopped) domains work, and
a live attach is refused by libvirt ("cannot open directory '/sys/bus/usb/devices'"), which is
the refused-live-attach case. Hot attach that succeeds is tested on the test host (tests/integration).
"""

from __future__ import annotations

import fcntl
import threading

import libvirt
import pytest

from tests.lib.domain_xml import NAMESPACE, hostdev, hostdevs, intent, metadata, source_xml
from tests.lib.domains import URI, Domains
from tests.lib.hostlock import wait_for_lock_waiter
from tests.lib.modrun import attach, failed, without_library
from tests.lib.trees import KINGSTON, KINGSTON_ID, REFERENCE, TWINS, hid, hub, mounted_stick, root_devno

KINGSTON_SELECTOR = {"vendor_id": "0951", "product_id": "1666"}
KINGSTON_HOSTDEV = hostdev("0951", "1666")
KINGSTON_INTENT = intent((KINGSTON_ID, KINGSTON_SELECTOR))


def test_cold_attach_writes_persistent_hostdev_and_intent(domains):
    name = domains.define("cold")
    result = attach({"domain": name, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert result["domain"]["name"] == name
    assert result["domain"]["state"] == "shutoff"
    assert result["domain"]["uuid"] == domains.lookup(name).UUIDString()
    [device] = result["devices"]
    assert device["id"] == KINGSTON_ID
    assert device["address"] == "002:002"
    assert device["attached_to"] == {"live": [], "persistent": [name]}
    assert result["actions"] == [
        'attach to %s (persistent): <hostdev mode="subsystem" type="usb"><source startupPolicy="optional">'
        '<vendor id="0x0951" /><product id="0x1666" /></source></hostdev>' % name,
        "record the intent of %s (persistent): %s" % (name, KINGSTON_ID),
    ]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [KINGSTON_HOSTDEV]
    assert metadata(xml) == KINGSTON_INTENT
    assert "diff" not in result


def test_second_run_is_idempotent_and_changes_no_byte(domains):
    name = domains.define("idem")
    assert attach({"domain": name, "devices": ["0951:1666"]})["changed"] is True
    before = domains.inactive(name)
    result = attach({"domain": name, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["changed"] is False
    assert result["actions"] == []
    assert result["devices"][0]["attached_to"] == {"live": [], "persistent": [name]}
    assert domains.inactive(name) == before


def test_check_mode_changes_nothing_and_predicts_the_diff(domains):
    name = domains.define("check")
    before = domains.inactive(name)
    checked = attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, diff=True)
    assert checked["rc"] == 0, checked
    assert checked["changed"] is True
    assert domains.inactive(name) == before
    assert checked["diff"] == {
        "before": "%s (persistent configuration):\n" % name,
        "after": "%s (persistent configuration):\n"
        '  <hostdev mode="subsystem" type="usb"><source startupPolicy="optional"><vendor id="0x0951" /><product id="0x1666" /></source></hostdev>\n'
        '  <kvmhost-usb:passthrough xmlns:kvmhost-usb="http://kvmhost.usb/ns/passthrough/1">\n'
        '    <kvmhost-usb:device id="%s" serial="E0D55EA5741AF160B9740A81" port="2-1" address="002:002">\n'
        '      <kvmhost-usb:selector vendor_id="0951" product_id="1666" />\n'
        "    </kvmhost-usb:device>\n"
        "  </kvmhost-usb:passthrough>\n" % (name, KINGSTON_ID),
    }
    done = attach({"domain": name, "devices": ["0951:1666"]}, diff=True)
    assert done["diff"] == checked["diff"]
    assert done["actions"] == checked["actions"]
    again = attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, diff=True)
    assert again["changed"] is False
    assert again["diff"]["before"] == again["diff"]["after"] == checked["diff"]["after"]


def test_ad_hoc_string_selectors_resolve_like_dicts(domains):
    name = domains.define("adhoc")
    for selector in ("0951:1666", "002:002", "2-1", KINGSTON_ID, {"address": "2:2"}, {"port": "2-1"}, {"serial": KINGSTON["serial"]}):
        result = attach({"domain": name, "devices": [selector]}, check_mode=True)
        assert result["rc"] == 0, (selector, result)
        assert [device["id"] for device in result["devices"]] == [KINGSTON_ID], selector


def test_domain_by_uuid(domains):
    name = domains.define("uuid")
    uuid = domains.lookup(name).UUIDString()
    result = attach({"domain": uuid, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["domain"]["name"] == name
    assert hostdevs(domains.inactive(name)) == [KINGSTON_HOSTDEV]


def test_identical_devices_chosen_by_serial_and_by_port_get_their_address(domains):
    name = domains.define("twins")
    result = attach(
        {"domain": name, "devices": [{"vendor_id": "0627", "product_id": "0001", "serial": "43"}, {"vendor_id": "0627", "product_id": "0001", "port": "1-1"}]},
        TWINS,
    )
    assert result["rc"] == 0, result
    assert [device["id"] for device in result["devices"]] == ["0627:0001:43", "0627:0001:42"]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 3, port=1), hostdev("0627", "0001", 1, 2, port=2)]
    assert metadata(xml) == intent(
        ("0627:0001:43", {"vendor_id": "0627", "product_id": "0001", "serial": "43"}),
        ("0627:0001:42", {"vendor_id": "0627", "product_id": "0001", "port": "1-1"}),
    )
    assert attach({"domain": name, "devices": ["0627:0001:43", "0627:0001:42"]}, TWINS)["changed"] is True  # selectors changed
    assert attach({"domain": name, "devices": ["0627:0001:43", "0627:0001:42"]}, TWINS)["changed"] is False


def test_replug_with_new_device_number_rebinds_the_address(domains):
    name = domains.define("replug")
    assert attach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)["changed"] is True
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 2)]
    replugged = REFERENCE[:1] + [hid("1-1", 7, serial="42")] + REFERENCE[2:] + [hid("1-2", 3, serial="43")]
    result = attach({"domain": name, "devices": ["0627:0001:42"]}, replugged)
    assert result["rc"] == 0, result
    assert result["changed"] is True
    # The re-bound entry records the new address, where it finds the device if a twin changes its id.
    assert [action.split(":")[0] for action in result["actions"]] == [
        "detach from %s (persistent)" % name,
        "attach to %s (persistent)" % name,
        "record the intent of %s (persistent)" % name,
    ]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 7)]
    assert metadata(xml) == intent(("0627:0001:42", {"id": "0627:0001:42"}, {"serial": "42", "port": "1-1", "address": "001:007"}))
    assert attach({"domain": name, "devices": ["0627:0001:42"]}, replugged)["changed"] is False


def test_replug_of_a_unique_device_needs_no_change(domains):
    name = domains.define("unique")
    attach({"domain": name, "devices": ["0951:1666"]})
    before = domains.inactive(name)
    replugged = [dict(device, devnum=9) if device is KINGSTON else device for device in REFERENCE]
    result = attach({"domain": name, "devices": ["0951:1666"]}, replugged)
    assert result["changed"] is False, result
    assert result["devices"][0]["address"] == "002:009"
    assert domains.inactive(name) == before


def test_twin_plugged_later_pins_the_vague_hostdev_to_its_address(domains):
    name = domains.define("pin")
    attach({"domain": name, "devices": [KINGSTON_ID]})
    assert hostdevs(domains.inactive(name)) == [KINGSTON_HOSTDEV]
    second = dict(KINGSTON, port="2-2", devnum=3, serial="SECOND")
    result = attach({"domain": name, "devices": [KINGSTON_ID]}, REFERENCE + [second])
    assert result["changed"] is True, result
    assert hostdevs(domains.inactive(name)) == [hostdev("0951", "1666", 2, 2)]


def test_hand_written_hostdev_is_adopted_not_duplicated(domains):
    name = domains.define("adopt", [source_xml("0951", "1666")])
    result = attach({"domain": name, "devices": ["0951:1666"]})
    assert result["rc"] == 0, result
    assert result["actions"] == ["record the intent of %s (persistent): %s" % (name, KINGSTON_ID)]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0951", "1666", policy=None)]
    assert metadata(xml) == KINGSTON_INTENT


def test_held_by_another_domain_fails_naming_it_and_steal_moves_it(domains):
    first = domains.define("holder")
    second = domains.define("taker")
    attach({"domain": first, "devices": ["0951:1666"]})
    before = domains.snapshot()
    failed(attach({"domain": second, "devices": ["0951:1666"]}), "is held by domain %s (persistent)" % first, "steal: true")
    assert domains.snapshot() == before
    result = attach({"domain": second, "devices": ["0951:1666"], "steal": True}, diff=True)
    assert result["rc"] == 0, result
    assert result["devices"][0]["attached_to"] == {"live": [], "persistent": [second]}
    assert hostdevs(domains.inactive(first)) == []
    assert metadata(domains.inactive(first)) is None
    assert hostdevs(domains.inactive(second)) == [KINGSTON_HOSTDEV]
    assert metadata(domains.inactive(second)) == KINGSTON_INTENT
    assert result["diff"]["before"].startswith("%s (persistent configuration):\n  <hostdev" % first)
    assert result["diff"]["after"].startswith("%s (persistent configuration):\n%s (persistent configuration):\n  <hostdev" % (first, second))


def test_hand_written_hostdev_in_another_domain_holds_the_device(domains):
    other = domains.define("byhand", [source_xml("0951", "1666", 2, 2)])
    name = domains.define("wants")
    failed(attach({"domain": name, "devices": ["0951:1666"]}), "held by domain %s (persistent)" % other)


def test_intent_alone_in_another_domain_holds_the_device(domains):
    other = domains.define("declares")
    domains.set_intent(other, '<passthrough><device id="%s"><selector vendor_id="0951" product_id="1666"/></device></passthrough>' % KINGSTON_ID)
    name = domains.define("claims")
    before = domains.snapshot()
    failed(attach({"domain": name, "devices": ["0951:1666"]}), "held by domain %s (persistent)" % other)
    assert domains.snapshot() == before


def test_identical_twin_held_elsewhere_does_not_block_the_other(domains):
    other = domains.define("twin-a")
    name = domains.define("twin-b")
    assert attach({"domain": other, "devices": ["0627:0001:42"]}, TWINS)["rc"] == 0
    result = attach({"domain": name, "devices": ["0627:0001:43"]}, TWINS)
    assert result["rc"] == 0, result
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 3)]


def test_concurrent_attaches_of_one_device_do_not_both_succeed(domains):
    for round_number in range(3):
        left = domains.define("race-left-%d" % round_number)
        right = domains.define("race-right-%d" % round_number)
        results = {}

        def run(name):
            results[name] = attach({"domain": name, "devices": ["0951:1666"]})

        threads = [threading.Thread(target=run, args=(name,)) for name in (left, right)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        outcomes = sorted(result["rc"] for result in results.values())
        assert outcomes[0] == 0 and outcomes[1] != 0, results
        holders = [name for name in (left, right) if hostdevs(domains.inactive(name))]
        assert len(holders) == 1, results
        loser = left if holders == [right] else right
        failed(results[loser], "held by domain %s" % holders[0])
        domains.remove(left)
        domains.remove(right)


def test_check_mode_creates_no_lock_file_and_waits_for_a_change_in_progress(domains, tmp_path):
    name = domains.define("check-lock")
    lock = tmp_path / "lock"
    env = {"KVMHOST_USB_LOCK": str(lock)}
    assert attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, env=env)["rc"] == 0
    assert not lock.exists()
    lock.touch()
    results = []
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        checking = threading.Thread(target=lambda: results.append(attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, env=env)))
        checking.start()
        wait_for_lock_waiter(lock, checking, results)
        assert results == []
    checking.join()
    assert results[0]["rc"] == 0 and results[0]["changed"] is True, results


def test_mounted_host_filesystem_is_refused_unless_allowed(domains):
    name = domains.define("critical")
    tree = [device for device in REFERENCE if device is not KINGSTON] + [mounted_stick()]
    before = domains.snapshot()
    message = failed(attach({"domain": name, "devices": ["0951:1666"]}, tree), "backs mounted filesystem(s) of the host: / (/dev/sdz1)")
    assert "allow_host_critical: true" in message
    assert domains.snapshot() == before
    result = attach({"domain": name, "devices": ["0951:1666"], "allow_host_critical": True}, tree)
    assert result["rc"] == 0, result
    assert hostdevs(domains.inactive(name)) == [KINGSTON_HOSTDEV]


def test_filesystem_on_device_mapper_above_the_stick_is_refused(domains):
    name = domains.define("stacked")
    stick = dict(KINGSTON, block=[("sdz", "8:240"), ("sdz1", "8:241", [("dm-9", root_devno())])])
    tree = [device for device in REFERENCE if device is not KINGSTON] + [stick]
    failed(attach({"domain": name, "devices": ["0951:1666"]}, tree), "/ (/dev/dm-9)")


def test_unmounted_storage_is_passed_through(domains):
    name = domains.define("unmounted")
    stick = dict(KINGSTON, block=[("sdz", "8:240"), ("sdz1", "8:241")])
    tree = [device for device in REFERENCE if device is not KINGSTON] + [stick]
    assert attach({"domain": name, "devices": ["0951:1666"]}, tree)["rc"] == 0


def test_persistent_false_needs_a_running_domain(domains):
    name = domains.define("transient-wish")
    before = domains.snapshot()
    failed(attach({"domain": name, "devices": ["0951:1666"], "persistent": False}), "persistent: false", "shutoff")
    assert domains.snapshot() == before


def test_auto_start_in_check_mode_says_it_would_start(domains):
    name = domains.define("autostart-check")
    result = attach({"domain": name, "devices": ["0951:1666"], "auto_start": True}, check_mode=True)
    assert result["rc"] == 0, result
    assert result["actions"][-1] == "start %s" % name
    assert result["domain"]["state"] == "running"
    assert not domains.lookup(name).isActive()


def test_auto_start_reports_the_start_failure_after_the_attach(domains):
    # Here the start itself fails (no USB in this kernel); on the test host it starts.
    name = domains.define("autostart")
    message = failed(attach({"domain": name, "devices": ["0951:1666"], "auto_start": True}), "starting domain %s failed" % name)
    assert "/sys/bus/usb/devices" in message
    assert hostdevs(domains.inactive(name)) == [KINGSTON_HOSTDEV]


# Errors: each one leaves every domain as it was.


@pytest.mark.parametrize(
    "selector, fragments",
    [
        ({"vendor_id": "09x1", "product_id": "1666"}, ["Malformed vendor_id '09x1'", "4 hexadecimal digits"]),
        ({"vendor_id": "0951", "product_id": "16666"}, ["Malformed product_id '16666'"]),
        ({"address": "2:999"}, ["Malformed address '2:999'", "BBB:DDD"]),
        ({"address": "two:two"}, ["Malformed address 'two:two'"]),
        ({"port": "2-1.x"}, ["Malformed port '2-1.x'", "port path such as 2-1.4"]),
        ({"colour": "blue"}, ["Unknown selector field(s) colour"]),
        ("not a selector", ["Cannot read device selector 'not a selector'"]),
    ],
)
def test_malformed_selector(domains, selector, fragments):
    name = domains.define("malformed")
    before = domains.snapshot()
    failed(attach({"domain": name, "devices": [selector]}), *fragments)
    assert domains.snapshot() == before


def test_unknown_device_names_what_the_host_has(domains):
    name = domains.define("unknown-device")
    before = domains.snapshot()
    failed(
        attach({"domain": name, "devices": [{"vendor_id": "0627", "product_id": "0001", "serial": "99"}]}),
        "No USB device matches (vendor_id=0627, product_id=0001, serial=99)",
        "Present with 0627:0001: 0627:0001:42 (Adomax Technology Co., Ltd QEMU USB Tablet, serial 42, port 1-1, address 001:002)",
    )
    failed(attach({"domain": name, "devices": ["abcd:0001"]}), "No USB device matches (vendor_id=abcd, product_id=0001). Present with abcd:0001: none")
    assert domains.snapshot() == before


def test_ambiguous_selector_lists_candidates_and_the_telling_field(domains):
    name = domains.define("ambiguous")
    before = domains.snapshot()
    failed(
        attach({"domain": name, "devices": ["0627:0001"]}, TWINS),
        "is ambiguous: 2 devices match",
        "0627:0001:42 (",
        "0627:0001:43 (",
        "Add 'serial' to the selector",
    )
    twins_without_serial = REFERENCE[:1] + [hid("1-1", 2), hid("1-2", 3)] + REFERENCE[2:]
    failed(attach({"domain": name, "devices": ["0627:0001"]}, twins_without_serial), "Add 'port' to the selector")
    assert domains.snapshot() == before


def test_hub_is_never_a_candidate(domains):
    name = domains.define("hub")
    failed(attach({"domain": name, "devices": ["1-3"]}, REFERENCE + [hub("1-3", 4)]), "matches a hub, which is never passed through")


def test_two_selectors_for_one_device(domains):
    name = domains.define("twice")
    failed(attach({"domain": name, "devices": ["0951:1666", "2-1"]}), "both choose %s" % KINGSTON_ID)


def test_unknown_domain(domains):
    domains.define("known")
    failed(
        attach({"domain": "kvmhost-usb-test-nowhere", "devices": ["0951:1666"]}),
        "Unknown domain 'kvmhost-usb-test-nowhere' at %s" % URI,
        "kvmhost-usb-test-known",
    )


def test_libvirt_unreachable(domains):
    name = domains.define("unreachable")
    failed(
        attach({"domain": name, "devices": ["0951:1666"], "uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"}),
        "Cannot connect to libvirt at qemu+unix:///system?socket=/nonexistent/libvirt-sock",
        "/nonexistent/libvirt-sock",
    )


@pytest.mark.parametrize("library, package", [("libvirt", "libvirt-python"), ("pyudev", "pyudev")])
def test_missing_library_on_the_target_names_the_package(domains, tmp_path, library, package):
    name = domains.define("nolib")
    result = attach({"domain": name, "devices": ["0951:1666"]}, env=without_library(tmp_path, library))
    failed(result, "Failed to import the required Python library (%s" % package, "python3-%s" % library)


# A running domain: live attach is refused on this machine, and must leave the persistent config as it was.


@pytest.fixture(scope="module")
def running():
    created = Domains()
    try:
        name = created.define("running")
        created.lookup(name).create()
        yield created, name
    finally:
        created.close()


def test_refused_live_attach_reports_libvirt_and_leaves_persistent_config(running):
    created, name = running
    before = created.snapshot()
    failed(
        attach({"domain": name, "devices": ["0951:1666"]}),
        "libvirt refused to attach to %s (live)" % name,
        "cannot open directory '/sys/bus/usb/devices'",
        "Nothing was changed",
    )
    assert created.snapshot() == before


def test_check_mode_on_a_running_domain_plans_live_then_persistent(running):
    created, name = running
    before = created.snapshot()
    result = attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, diff=True)
    assert result["rc"] == 0, result
    assert result["domain"]["state"] == "running"
    assert result["actions"] == [
        'attach to %s (live): <hostdev mode="subsystem" type="usb"><source><vendor id="0x0951" /><product id="0x1666" />'
        '<address bus="2" device="2" /></source></hostdev>' % name,
        'attach to %s (persistent): <hostdev mode="subsystem" type="usb"><source startupPolicy="optional"><vendor id="0x0951" />'
        '<product id="0x1666" /></source></hostdev>' % name,
        "record the intent of %s (live): %s" % (name, KINGSTON_ID),
        "record the intent of %s (persistent): %s" % (name, KINGSTON_ID),
    ]
    assert "%s (live configuration):\n" % name in result["diff"]["after"]
    assert created.snapshot() == before


def test_live_intent_of_a_running_domain_holds_the_device(running, domains):
    created, holder = running
    created.set_intent(holder, '<passthrough><device id="%s"><selector vendor_id="0951" product_id="1666"/></device></passthrough>' % KINGSTON_ID, live=True)
    try:
        name = domains.define("after-running")
        failed(attach({"domain": name, "devices": ["0951:1666"]}), "held by domain %s (live)" % holder)
    finally:
        created.lookup(holder).setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE)


# exclusive: the domain holds exactly the given devices afterwards.


def test_exclusive_takes_away_the_undeclared_devices_and_keeps_the_declared(domains):
    name = domains.define("exclusive")
    assert attach({"domain": name, "devices": ["0951:1666", "0627:0001:42"]})["rc"] == 0
    result = attach({"domain": name, "devices": ["0951:1666"], "exclusive": True})
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert [action.split(":")[0] for action in result["actions"]] == [
        "detach from %s (persistent)" % name,
        "record the intent of %s (persistent)" % name,
    ]
    assert "0x0627" in result["actions"][0]
    xml = domains.inactive(name)
    assert hostdevs(xml) == [KINGSTON_HOSTDEV]
    assert metadata(xml) == KINGSTON_INTENT
    again = attach({"domain": name, "devices": ["0951:1666"], "exclusive": True})
    assert again["changed"] is False, again
    assert domains.inactive(name) == xml


def test_exclusive_leaves_other_domains_alone(domains):
    other = domains.define("exclusive-neighbour")
    name = domains.define("exclusive-alone")
    assert attach({"domain": other, "devices": ["0627:0001:42"]})["rc"] == 0
    neighbour = domains.inactive(other)
    result = attach({"domain": name, "devices": ["0951:1666"], "exclusive": True})
    assert result["rc"] == 0, result
    assert domains.inactive(other) == neighbour


def test_exclusive_without_devices_empties_the_domain_stale_and_hand_written_included(domains):
    absent_id = "0627:0001:99"
    name = domains.define("exclusive-empty", [source_xml("0951", "1666"), source_xml("0627", "0001", 1, 9)])
    domains.set_intent(name, '<passthrough><device id="%s"><selector id="%s"/></device></passthrough>' % (absent_id, absent_id))
    failed(attach({"domain": name, "devices": []}), "No devices given")
    before = domains.snapshot()
    checked = attach({"domain": name, "devices": [], "exclusive": True}, check_mode=True, diff=True)
    assert checked["rc"] == 0, checked
    assert checked["changed"] is True
    assert len(checked["actions"]) == 3
    assert checked["diff"]["after"] == "%s (persistent configuration):\n" % name
    assert domains.snapshot() == before
    result = attach({"domain": name, "devices": [], "exclusive": True})
    assert result["rc"] == 0, result
    assert result["actions"] == checked["actions"]
    xml = domains.inactive(name)
    assert hostdevs(xml) == []
    assert metadata(xml) is None
    assert attach({"domain": name, "devices": [], "exclusive": True})["changed"] is False


def test_exclusive_rebinds_a_declared_twin_and_drops_the_other(domains):
    name = domains.define("exclusive-twins")
    assert attach({"domain": name, "devices": ["0627:0001:42", "0627:0001:43"]}, TWINS)["rc"] == 0
    result = attach({"domain": name, "devices": ["0627:0001:43"], "exclusive": True}, TWINS)
    assert result["rc"] == 0, result
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 3, port=2)]
    assert metadata(xml) == intent(("0627:0001:43", {"id": "0627:0001:43"}))
