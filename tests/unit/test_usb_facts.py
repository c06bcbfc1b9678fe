"""usb_facts: real pyudev under umockdev-run, real libvirtd for attachments."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

from tests.lib import domains
from tests.lib.domain_xml import source_xml
from tests.lib.modrun import run_module
from tests.lib.trees import KINGSTON, REFERENCE, TABLET, hid, hub
from tests.lib.usbtree import root_hub

NO_HOST_CONF = {"host_conf": "/nonexistent/host.conf"}


def facts(devices, **args):
    result = run_module("usb_facts", dict(NO_HOST_CONF, **args), devices)
    assert result["rc"] == 0, result
    assert result["changed"] is False
    return result["ansible_facts"]


def by_port(devices):
    return dict((device["port"], device) for device in devices)


def test_reference_example_exact_facts():
    result = facts(REFERENCE)
    assert result["usb_devices"] == [
        {
            "id": "0627:0001:42",
            "vendor_id": "0627",
            "product_id": "0001",
            "vendor_device_id": "0627:0001",
            "manufacturer": "QEMU",
            "product": "QEMU USB Tablet",
            "model": "Adomax Technology Co., Ltd QEMU USB Tablet",
            "serial": "42",
            "bus": 1,
            "device": 2,
            "address": "001:002",
            "port": "1-1",
            "speed": 480,
            "usb_version": "2.00",
            "class": ["Human Interface Device"],
            "driver": "usbhid",
            "is_hub": False,
            "sys_path": "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-1",
            "attached_to": {"live": [], "persistent": []},
            "exported_to": None,
            "imported_from": None,
        },
        {
            "id": "0951:1666:E0D55EA5741AF160B9740A81",
            "vendor_id": "0951",
            "product_id": "1666",
            "vendor_device_id": "0951:1666",
            "manufacturer": "Kingston",
            "product": "DataTraveler 3.0",
            "model": "Kingston Technology DataTraveler 100 G3/G4/SE9 G2/50",
            "serial": "E0D55EA5741AF160B9740A81",
            "bus": 2,
            "device": 2,
            "address": "002:002",
            "port": "2-1",
            "speed": 5000,
            "usb_version": "3.20",
            "class": ["Mass Storage"],
            "driver": "usb-storage",
            "is_hub": False,
            "sys_path": "/sys/devices/pci0000:00/0000:00:14.0/usb2/2-1",
            "attached_to": {"live": [], "persistent": []},
            "exported_to": None,
            "imported_from": None,
        },
    ]
    assert result["passthrough_enabled"] is None


def test_reference_example_topology_has_root_hubs_and_children():
    topology = facts(REFERENCE)["usb_topology"]
    assert [(node["port"], node["model"], node["is_hub"]) for node in topology] == [
        ("usb1", "Linux Foundation 2.0 root hub", True),
        ("usb2", "Linux Foundation 3.0 root hub", True),
    ]
    assert [child["id"] for child in topology[0]["children"]] == ["0627:0001:42"]
    assert [child["id"] for child in topology[1]["children"]] == ["0951:1666:E0D55EA5741AF160B9740A81"]
    assert topology[1]["children"][0]["class"] == ["Mass Storage"]
    assert topology[1]["children"][0]["children"] == []


def test_include_hubs_lists_root_hubs_too():
    devices = facts(REFERENCE, include_hubs=True)["usb_devices"]
    assert [(device["address"], device["vendor_device_id"], device["is_hub"]) for device in devices] == [
        ("001:001", "1d6b:0002", True),
        ("001:002", "0627:0001", False),
        ("002:001", "1d6b:0003", True),
        ("002:002", "0951:1666", False),
    ]
    assert devices[0]["class"] == ["Hub"]
    assert devices[0]["id"] == "1d6b:0002:0000%3A00%3A14.0"


def test_identical_devices_with_distinct_serials_get_serial_ids():
    tree = [root_hub(1), hid("1-1", 2, serial="TAB-A"), hid("1-2", 3, serial="TAB-B")]
    devices = facts(tree)["usb_devices"]
    assert [(device["port"], device["id"]) for device in devices] == [
        ("1-1", "0627:0001:TAB-A"),
        ("1-2", "0627:0001:TAB-B"),
    ]


def test_identical_devices_without_serials_get_port_ids():
    tree = [root_hub(1), hid("1-1", 2), hid("1-2", 3)]
    devices = facts(tree)["usb_devices"]
    assert [(device["id"], device["serial"]) for device in devices] == [
        ("0627:0001@1-1", None),
        ("0627:0001@1-2", None),
    ]


def test_shared_serial_falls_back_to_port_for_every_holder():
    # QEMU gives all its HID devices serial "42": a serial two devices share identifies neither.
    tree = [root_hub(1), hid("1-1", 2, serial="42"), hid("1-2", 3, serial="42"), hid("1-3", 4, serial="UNIQUE")]
    ids = [device["id"] for device in facts(tree)["usb_devices"]]
    assert ids == ["0627:0001@1-1", "0627:0001@1-2", "0627:0001:UNIQUE"]


def test_id_survives_new_device_number_and_serial_id_survives_new_port():
    before = facts([root_hub(1), root_hub(2, usb3=True), KINGSTON, hid("1-1", 2)])["usb_devices"]
    # Replug: both get new device numbers; the stick also moves to another port.
    after = facts([root_hub(1), root_hub(2, usb3=True), dict(KINGSTON, port="2-3", devnum=7), hid("1-1", 5)])["usb_devices"]
    assert [device["address"] for device in before] == ["001:002", "002:002"]
    assert [device["address"] for device in after] == ["001:005", "002:007"]
    assert [device["id"] for device in before] == [device["id"] for device in after] == [
        "0627:0001@1-1",
        "0951:1666:E0D55EA5741AF160B9740A81",
    ]


def test_devices_behind_a_hub():
    tree = [
        root_hub(1),
        hub("1-2", 2),
        hid("1-2.1", 3, serial="K1", product="QEMU USB Keyboard"),
        dict(KINGSTON, port="1-2.3", devnum=4, speed="480", version=" 2.00"),
        hub("1-2.4", 5),
        hid("1-2.4.1", 6, serial="M1"),
    ]
    result = facts(tree)
    listed = result["usb_devices"]
    assert [(device["port"], device["id"]) for device in listed] == [
        ("1-2.1", "0627:0001:K1"),
        ("1-2.3", "0951:1666:E0D55EA5741AF160B9740A81"),
        ("1-2.4.1", "0627:0001:M1"),
    ]
    root = result["usb_topology"][0]
    assert root["port"] == "usb1"
    outer = root["children"]
    assert [(node["port"], node["is_hub"], node["class"]) for node in outer] == [("1-2", True, ["Hub"])]
    assert [node["port"] for node in outer[0]["children"]] == ["1-2.1", "1-2.3", "1-2.4"]
    assert [node["port"] for node in outer[0]["children"][2]["children"]] == ["1-2.4.1"]
    with_hubs = by_port(facts(tree, include_hubs=True)["usb_devices"])
    assert with_hubs["1-2"]["is_hub"] is True
    assert with_hubs["1-2"]["id"] == "0409:55aa@1-2"
    assert with_hubs["1-2.4"]["id"] == "0409:55aa@1-2.4"


def test_device_without_strings_or_serial_uses_database_names():
    bare = {
        "port": "1-4",
        "vendor_id": "1a86",
        "product_id": "7523",
        "devnum": 9,
        "vendor_db": "QinHeng Electronics",
        "model_db": "CH340 serial converter",
        "speed": "12",
        "version": " 1.10",
        "device_class": "ff",
        "interfaces": [("ff", "ch341")],
    }
    device = facts([root_hub(1), bare])["usb_devices"][0]
    assert device["manufacturer"] == "QinHeng Electronics"
    assert device["product"] == "CH340 serial converter"
    assert device["model"] == "QinHeng Electronics CH340 serial converter"
    assert device["serial"] is None
    assert device["id"] == "1a86:7523@1-4"
    assert device["class"] == ["Vendor Specific Class"]
    assert device["speed"] == 12
    assert device["driver"] == "ch341"


def test_device_unknown_to_the_database_and_without_strings():
    nameless = {"port": "1-5", "vendor_id": "abcd", "product_id": "ef01", "devnum": 3, "speed": "1.5", "interfaces": [("03", None)]}
    device = facts([root_hub(1), nameless])["usb_devices"][0]
    assert (device["manufacturer"], device["product"], device["model"], device["serial"]) == (None, None, None, None)
    assert device["speed"] == 1.5
    assert device["driver"] is None
    assert device["class"] == ["Human Interface Device"]
    assert device["id"] == "abcd:ef01@1-5"


def test_odd_characters_in_strings_and_serial():
    odd = hid(
        "1-1",
        2,
        serial="SN 01:02/é@x",
        manufacturer="Ünïcode «Maker» & $HOME `x`",
        product="Dongle\\with back\\slash",
    )
    device = facts([root_hub(1), odd])["usb_devices"][0]
    assert device["serial"] == "SN 01:02/é@x"
    assert device["manufacturer"] == "Ünïcode «Maker» & $HOME `x`"
    assert device["product"] == "Dongle\\with back\\slash"
    assert device["id"] == "0627:0001:SN%2001%3A02%2F%C3%A9%40x"
    # The id is accepted back as a filter/selector.
    again = facts([root_hub(1), odd], serial="SN 01:02/é@x")["usb_devices"]
    assert [entry["id"] for entry in again] == [device["id"]]


def test_filters_select_by_vendor_product_serial_and_port():
    tree = [root_hub(1), root_hub(2, usb3=True), KINGSTON, hid("1-1", 2, serial="A"), hid("1-2", 3, serial="B")]
    assert [d["port"] for d in facts(tree, vendor_id="0627")["usb_devices"]] == ["1-1", "1-2"]
    assert [d["port"] for d in facts(tree, vendor_id="0951", product_id="1666")["usb_devices"]] == ["2-1"]
    assert [d["port"] for d in facts(tree, serial="B")["usb_devices"]] == ["1-2"]
    assert [d["port"] for d in facts(tree, port="1-1")["usb_devices"]] == ["1-1"]
    assert facts(tree, vendor_id="0627", serial="nope")["usb_devices"] == []


@pytest.mark.parametrize(
    "args, message",
    [
        ({"vendor_id": "95"}, "Malformed vendor_id '95'"),
        ({"product_id": "xyz1"}, "Malformed product_id 'xyz1'"),
        ({"port": "usb1/2"}, "Malformed port 'usb1/2'"),
    ],
)
def test_malformed_filters_fail_clearly(args, message):
    result = run_module("usb_facts", dict(NO_HOST_CONF, **args), REFERENCE)
    assert result["failed"] is True
    assert message in result["msg"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, None),
        ("# host agent\nhostname: kvm1\ndisable_usb: false\n", True),
        ("disable_usb: true\n", False),
        ("disable_usb: False  # enabled for dongles\n", True),
        ("hostname: kvm1\n", False),
        ("# disable_usb: false\nhostname: kvm1\n", False),
        ("nested:\n  disable_usb: false\n", False),
        ("disable_usb:\n", False),
        ("disable_usb: 'false'\n", True),
    ],
)
def test_passthrough_enabled_read_back_from_host_conf(text, expected):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "host.conf")
        if text is not None:
            with open(path, "w") as handle:
                handle.write(text)
        assert facts(REFERENCE, host_conf=path)["passthrough_enabled"] is expected


def test_no_usb_at_all_gives_empty_lists():
    result = facts(None)
    assert result["usb_devices"] == []
    assert result["usb_topology"] == []


def test_attachments_from_persistent_configs_of_real_domains():
    tree = [root_hub(1), root_hub(2, usb3=True), TABLET, KINGSTON, hid("1-2", 3, serial="OTHER")]
    specs = {
        "kvmhost-usb-test-facts-a": [source_xml("0951", "1666")],
        "kvmhost-usb-test-facts-b": [source_xml(bus=1, device=2)],
        "kvmhost-usb-test-facts-c": [],
    }
    with domains.defined_domains(specs):
        devices = by_port(facts(tree)["usb_devices"])
    assert devices["2-1"]["attached_to"] == {"live": [], "persistent": ["kvmhost-usb-test-facts-a"]}
    assert devices["1-1"]["attached_to"] == {"live": [], "persistent": ["kvmhost-usb-test-facts-b"]}
    assert devices["1-2"]["attached_to"] == {"live": [], "persistent": []}


def test_hostdev_with_stale_address_designates_no_device():
    # Device 2 on bus 1 replugged as device 7: a hostdev pinned to 001:002 no longer holds it.
    tree = [root_hub(1), hid("1-1", 7, serial="X")]
    with domains.defined_domains({"kvmhost-usb-test-facts-stale": [source_xml("0627", "0001", bus=1, device=2)]}):
        device = facts(tree)["usb_devices"][0]
    assert device["attached_to"] == {"live": [], "persistent": []}


def test_unreachable_libvirt_still_returns_devices_with_a_warning():
    result = run_module("usb_facts", dict(NO_HOST_CONF, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock"), REFERENCE)
    assert result["rc"] == 0
    assert [device["id"] for device in result["ansible_facts"]["usb_devices"]] == [
        "0627:0001:42",
        "0951:1666:E0D55EA5741AF160B9740A81",
    ]
    assert any("Not reporting attachments: Cannot connect to libvirt" in warning for warning in result["warnings"])


def bare_python_path(tmp):
    """A PYTHONPATH entry with ansible alone."""
    import ansible

    os.symlink(os.path.dirname(ansible.__file__), os.path.join(tmp, "ansible"))
    return tmp


def test_missing_pyudev_on_the_target_names_the_package():
    with tempfile.TemporaryDirectory() as tmp:
        bare = bare_python_path(tmp)
        probe = run_module(
            "usb_facts",
            NO_HOST_CONF,
            REFERENCE,
            # -S: no site-packages at all, so neither the venv's nor Debian's pyudev is importable.
            python=("/usr/bin/python3", "-S"),
            python_path=(bare,),
        )
    assert probe["failed"] is True
    assert "python3-pyudev" in probe["msg"]
    assert "pip install pyudev" in probe["msg"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_domains_with_hostdevs_intent_and_stale_addresses():
    # The tablet was replugged as device 7: the hostdev pinned to 001:002 is stale; the stick is
    # named by vendor:product; the intent of the first domain names the tablet.
    tree = [root_hub(1), root_hub(2, usb3=True), hid("1-1", 7, serial="42"), KINGSTON]
    specs = {
        "kvmhost-usb-test-facts-dom-a": [source_xml("0627", "0001", bus=1, device=2), source_xml("0951", "1666")],
        "kvmhost-usb-test-facts-dom-b": [],
    }
    with domains.defined_domains(specs) as conn:
        conn.lookupByName("kvmhost-usb-test-facts-dom-a").setMetadata(
            2,  # VIR_DOMAIN_METADATA_ELEMENT
            '<passthrough><device id="0627:0001:42"><selector id="0627:0001:42"/></device></passthrough>',
            "kvmhost-usb",
            "http://kvmhost.usb/ns/passthrough/1",
            2,  # VIR_DOMAIN_AFFECT_CONFIG
        )
        listed = dict((domain["name"], domain) for domain in facts(tree)["usb_domains"])
    first = listed["kvmhost-usb-test-facts-dom-a"]
    assert first["state"] == "shutoff"
    assert first["live"] is None
    assert first["persistent"] == {
        "hostdevs": [
            {
                "vendor_id": "0627",
                "product_id": "0001",
                "bus": 1,
                "device": 2,
                "address": "001:002",
                "startup_policy": None,
                "devices": [],
                "stale": True,
            },
            {
                "vendor_id": "0951",
                "product_id": "1666",
                "bus": None,
                "device": None,
                "address": None,
                "startup_policy": None,
                "devices": ["0951:1666:E0D55EA5741AF160B9740A81"],
                "stale": False,
            },
        ],
        "intent": [{"id": "0627:0001:42", "selector": {"id": "0627:0001:42"}, "status": "stale"}],
    }
    assert listed["kvmhost-usb-test-facts-dom-b"]["persistent"] == {"hostdevs": [], "intent": []}


def test_declared_devices_attached_missing_or_stale():
    # dom-a holds the stick by vendor:product (attached) and declares an unplugged dongle (missing);
    # dom-b declares the tablet that was replugged as device 7 while its hostdev names 001:002 (stale).
    tree = [root_hub(1), root_hub(2, usb3=True), hid("1-1", 7, serial="42"), KINGSTON]
    specs = {
        "kvmhost-usb-test-facts-status-a": [source_xml("0951", "1666")],
        "kvmhost-usb-test-facts-status-b": [source_xml("0627", "0001", bus=1, device=2)],
    }
    intents = {
        "kvmhost-usb-test-facts-status-a": '<device id="0951:1666:E0D55EA5741AF160B9740A81"><selector vendor_id="0951" product_id="1666"/></device>'
        '<device id="0529:0001:1A2B3C"><selector serial="1A2B3C"/></device>',
        "kvmhost-usb-test-facts-status-b": '<device id="0627:0001:42"><selector serial="42"/></device>',
    }
    with domains.defined_domains(specs) as conn:
        for name, entries in intents.items():
            conn.lookupByName(name).setMetadata(2, "<passthrough>%s</passthrough>" % entries, "kvmhost-usb", "http://kvmhost.usb/ns/passthrough/1", 2)
        listed = dict((domain["name"], domain) for domain in facts(tree)["usb_domains"])
    statuses = dict(
        (name, [(entry["id"], entry["status"]) for entry in listed[name]["persistent"]["intent"]]) for name in intents
    )
    assert statuses == {
        "kvmhost-usb-test-facts-status-a": [("0951:1666:E0D55EA5741AF160B9740A81", "attached"), ("0529:0001:1A2B3C", "missing")],
        "kvmhost-usb-test-facts-status-b": [("0627:0001:42", "stale")],
    }


def test_no_domains_reported_when_libvirt_is_unreachable():
    result = run_module("usb_facts", dict(NO_HOST_CONF, uri="qemu+unix:///system?socket=/nonexistent/libvirt-sock"), REFERENCE)
    assert result["rc"] == 0
    assert result["ansible_facts"]["usb_domains"] == []
