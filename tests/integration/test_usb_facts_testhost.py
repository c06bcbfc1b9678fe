"""usb_facts on the real-USB test host, checked against what the test host's kernel enumerated."""

from __future__ import annotations

import textwrap

from tests.testhost import TestHost
from tests.testhost.ansible import usb_facts


def by_port(devices: list[dict]) -> dict[str, dict]:
    return {device["port"]: device for device in devices}


def assert_facts_match_kernel(facts: list[dict], kernel: list[dict]) -> None:
    facts_by_port = by_port(facts)
    kernel_by_port = by_port(kernel)
    assert sorted(facts_by_port) == sorted(kernel_by_port)
    for port, seen in kernel_by_port.items():
        fact = facts_by_port[port]
        bus, devnum = int(seen["busnum"]), int(seen["devnum"])
        assert (fact["vendor_id"], fact["product_id"]) == (seen["idVendor"], seen["idProduct"]), port
        assert fact["serial"] == seen["serial"], port
        assert (fact["bus"], fact["device"]) == (bus, devnum), port
        assert fact["address"] == "%03d:%03d" % (bus, devnum), port


def test_facts_match_the_kernel(testhost: TestHost) -> None:
    facts = usb_facts(testhost)
    assert_facts_match_kernel(facts, testhost.kernel_usb_devices())
    ports = by_port(facts)
    topology = testhost.topology
    # The declared topology is what the kernel enumerated, hub nesting included.
    assert ports[topology.linux_port("stick")]["id"] == "46f4:0001:KING0001"
    assert ports[topology.linux_port("serial0")]["id"] == "0403:6001:FTDI0001"
    assert ports[topology.linux_port("serial0")]["port"] == "1-5.1"
    assert ports[topology.linux_port("hub")]["is_hub"] is True
    assert ports["usb1"]["is_hub"] is True


def test_identical_devices_get_distinct_ids(testhost: TestHost) -> None:
    facts = usb_facts(testhost, include_hubs=False)
    twins = [device for device in facts if device["serial"] in ("TWIN-A", "TWIN-B")]
    assert [device["vendor_device_id"] for device in twins] == ["0627:0001", "0627:0001"]
    assert sorted(device["id"] for device in twins) == ["0627:0001:TWIN-A", "0627:0001:TWIN-B"]
    ids = [device["id"] for device in facts]
    assert len(ids) == len(set(ids))
    assert not any(device["is_hub"] for device in facts)


def test_replug_changes_the_address_not_the_id(testhost: TestHost) -> None:
    before = by_port(usb_facts(testhost))["2-1"]
    testhost.replug("stick")
    kernel = testhost.wait_usb(lambda devices: any(d["port"] == "2-1" and int(d["devnum"]) != before["device"] for d in devices))
    facts = usb_facts(testhost)
    after = by_port(facts)["2-1"]
    assert after["id"] == before["id"] == "46f4:0001:KING0001"
    assert after["device"] != before["device"]
    assert after["address"] != before["address"]
    assert_facts_match_kernel(facts, kernel)


def test_serial_id_follows_the_device_into_another_port(testhost: TestHost) -> None:
    stick = testhost.topology.device("stick")
    testhost.replug("stick", port="6")
    try:
        testhost.wait_usb(lambda devices: any(d["port"] == "2-6" for d in devices))
        facts = by_port(usb_facts(testhost))
        assert "2-1" not in facts
        assert facts["2-6"]["id"] == "46f4:0001:KING0001"
    finally:
        testhost.replug("stick", port=stick.port)
        testhost.wait_usb(lambda devices: any(d["port"] == "2-1" for d in devices))


def test_unplugged_device_disappears(testhost: TestHost) -> None:
    testhost.unplug("twin-b")
    try:
        kernel = testhost.wait_usb(lambda devices: not any(d["serial"] == "TWIN-B" for d in devices))
        facts = usb_facts(testhost)
        assert "0627:0001:TWIN-B" not in [device["id"] for device in facts]
        assert_facts_match_kernel(facts, kernel)
    finally:
        testhost.plug("twin-b")
        testhost.wait_usb(lambda devices: any(d["serial"] == "TWIN-B" for d in devices))


def test_colliding_serials_fall_back_to_port_ids(testhost_factory, tmp_path) -> None:
    # Two identical devices that even share a serial (older QEMU gave every tablet "42"):
    # only the port tells them apart.
    topology = tmp_path / "same-serial.yml"
    topology.write_text(textwrap.dedent("""\
        devices:
          - {id: left, kind: tablet, serial: "42", port: 1}
          - {id: right, kind: tablet, serial: "42", port: 2}
        """))
    host = testhost_factory("same-serial", str(topology))
    facts = usb_facts(host)
    tablets = [device for device in facts if not device["is_hub"]]
    assert sorted(device["id"] for device in tablets) == ["0627:0001@1-1", "0627:0001@1-2"]
    assert [device["serial"] for device in tablets] == ["42", "42"]
    assert_facts_match_kernel(facts, host.kernel_usb_devices())


def test_guest_receives_a_device_and_facts_name_it(testhost: TestHost, guest: str) -> None:
    assert testhost.guest_usb(guest) == []
    hostdev = "<hostdev mode='subsystem' type='usb'><source><vendor id='0x46f4'/><product id='0x0001'/></source></hostdev>"
    testhost.ssh("virsh", "attach-device", guest, "/dev/stdin", "--live", input=hostdev)
    seen = testhost.guest_usb(guest)
    assert [device["product"] for device in seen] == ["QEMU USB HARDDRIVE"]
    stick = by_port(usb_facts(testhost))["2-1"]
    assert stick["attached_to"]["live"] == [guest]
