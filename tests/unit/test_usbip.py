"""The USB/IP wire protocol, the vhci status, the exports table and the exporter's per-peer answers.

This machine has no USB kernel (no usbip-host, no vhci-hcd): the exporter runs here against a directory laid out
like the kernel's /sys/bus/usb (a stand-in, said so where it is made), and real TCP over loopback; writing the socket
to usbip_sockfd and the vhci attach are exercised on the test host (tests/integration/test_crosshost_testhost.py).
"""

from __future__ import annotations

import select
import shutil
import socket
import struct
import time

import pytest

from tests.lib.usbip_exporter import STICK, fake_sysfs, serving, serving_process

from ansible_collections.kvmhost.usb.plugins.module_utils import _errors  # noqa: E402  (usbip_exporter put it on the path)
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import importer, sysfs, table, wire  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.exporter import notify_ready  # noqa: E402


def spec_bytes(device):
    """usbip_usb_device written out by hand from the spec's table: offsets 0, 256, 288, 292, 296, 300, 302, 304, 306..311."""
    data = bytearray(312)
    path = device["path"].encode().ljust(256, b"\0")
    data[0:256] = path
    data[256:288] = device["busid"].encode().ljust(32, b"\0")
    data[288:292] = device["busnum"].to_bytes(4, "big")
    data[292:296] = device["devnum"].to_bytes(4, "big")
    data[296:300] = device["speed"].to_bytes(4, "big")
    data[300:302] = bytes.fromhex(device["vendor_id"])
    data[302:304] = bytes.fromhex(device["product_id"])
    data[304:306] = device["bcd_device"].to_bytes(2, "big")
    data[306] = device["device_class"]
    data[307] = device["device_subclass"]
    data[308] = device["device_protocol"]
    data[309] = device["configuration_value"]
    data[310] = device["num_configurations"]
    data[311] = len(device["interfaces"])
    return bytes(data)


def test_usb_device_is_packed_as_the_spec_lays_it_out_and_reads_back():
    packed = wire.pack_usb_device(STICK)
    assert len(packed) == 312
    assert packed == spec_bytes(STICK)
    back = wire.unpack_usb_device(packed)
    for key in ("path", "busid", "busnum", "devnum", "speed", "vendor_id", "product_id", "configuration_value"):
        assert back[key] == STICK[key], key
    assert back["num_interfaces"] == 1
    assert back["devid"] == (2 << 16) | 3 == 0x00020003


def test_op_common_headers_match_the_spec():
    # OP_REQ_DEVLIST: version 0x0111, code 0x8005, status 0.
    assert wire.pack_op_common(wire.OP_REQ_DEVLIST) == bytes.fromhex("0111 8005 00000000")
    request = wire.pack_import_request("2-1")
    assert request[:8] == bytes.fromhex("0111 8003 00000000")
    assert request[8:] == b"2-1" + b"\0" * 29
    assert wire.unpack_op_common(bytes.fromhex("0111 0003 00000004")) == {"version": 0x0111, "code": 0x0003, "status": wire.ST_NODEV}


def test_devlist_reply_carries_the_count_then_each_device_and_its_interfaces():
    reply = wire.pack_devlist_reply([STICK])
    assert reply[:8] == bytes.fromhex("0111 0005 00000000")
    assert reply[8:12] == (1).to_bytes(4, "big")
    assert reply[12:324] == spec_bytes(STICK)
    assert reply[324:] == bytes([0x08, 0x06, 0x50, 0x00])


VHCI_STATUS = """hub port sta spd dev      sockfd local_busid
hs  0000 006 003 00020003 000003 3-1
hs  0001 004 000 00000000 000000 0-0
ss  0002 004 000 00000000 000000 0-0
ss  0003 004 000 00000000 000000 0-0
"""


def test_vhci_status_lines_and_the_free_port_of_the_right_hub():
    ports = sysfs.parse_vhci_status(VHCI_STATUS)
    assert ports[0] == {"hub": "hs", "port": 0, "status": 6, "speed": 3, "devid": 0x20003, "local_busid": "3-1"}
    assert ports[1]["local_busid"] is None
    assert sysfs.free_port(ports, wire.USB_SPEED_HIGH) == 1
    assert sysfs.free_port(ports, wire.USB_SPEED_SUPER) == 2
    used = [dict(item, status=6) if item["hub"] == "hs" else item for item in ports]
    with pytest.raises(_errors.UsbipError, match="No free hs port"):
        sysfs.free_port(used, wire.USB_SPEED_FULL)


def test_exports_table_is_written_once_and_read_back(tmp_path):
    path = str(tmp_path / "etc" / "exports.json")
    assert table.read_exports(path) == {"listen": None, "port": 3240, "exports": []}
    written = {
        "listen": "10.77.0.1",
        "port": 3240,
        "exports": [
            {"id": "46f4:0001:KING0001", "importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm", "selector": {"id": "46f4:0001:KING0001"}}
        ],
    }
    assert table.write_exports(written, path) is True
    assert table.write_exports(written, path) is False
    assert table.read_exports(path) == written
    (tmp_path / "etc" / "exports.json").write_text("{not json")
    with pytest.raises(_errors.UsbipError, match="Cannot read the exports table"):
        table.read_exports(path)


@pytest.fixture
def exporter(tmp_path):
    base = fake_sysfs(tmp_path / "sys", STICK)
    export = {"id": "46f4:0001:KING0001", "selector": {"id": "46f4:0001:KING0001"}, "importer": "kvm2", "importer_address": "127.0.0.1", "domain": "buildvm"}
    with serving(tmp_path, [export], tmp_path / "sys") as (served, port, lines):
        yield served, port, lines, base


def test_exporter_offers_the_declared_peer_its_device(exporter):
    served, port, lines, _base = exporter
    assert served.bound == {"2-1": served.table["exports"][0]}
    offered = wire.remote_devices("127.0.0.1", port)
    assert [(device["busid"], device["vendor_id"], device["product_id"], device["speed"], device["devid"]) for device in offered] == [
        ("2-1", "46f4", "0001", wire.USB_SPEED_SUPER, 0x20003)
    ]
    assert offered[0]["interfaces"] == [(0x08, 0x06, 0x50)]
    assert lines == ["loaded 1 export(s) from %s" % served.path, "listening on 127.0.0.1:%d" % port]


def test_exporter_hands_the_socket_of_an_import_to_the_kernel_file(exporter):
    served, port, lines, base = exporter
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(wire.pack_import_request("2-1"))
    header = wire.unpack_op_common(wire.receive(sock, 8))
    device = wire.unpack_usb_device(wire.receive(sock, 312))
    sock.close()
    assert header == {"version": 0x0111, "code": wire.OP_REP_IMPORT, "status": wire.ST_OK}
    assert device["busid"] == "2-1" and device["devid"] == 0x20003
    # The stand-in file received a descriptor number, as the kernel's usbip_sockfd would.
    assert (base / "usbip_sockfd").read_text().strip().isdigit()
    assert lines[-1] == "exported 2-1 (46f4:0001:KING0001) to kvm2 (127.0.0.1), domain buildvm"


def test_exporter_refuses_an_import_of_a_device_not_exported(exporter):
    _served, port, lines, _base = exporter
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(wire.pack_import_request("1-1"))
    header = wire.unpack_op_common(wire.receive(sock, 8))
    sock.close()
    assert header["status"] == wire.ST_NODEV
    assert lines[-1] == "refused the import of 1-1 by 127.0.0.1: not exported to it"


def test_exporter_closes_a_connection_from_another_address_at_once(exporter):
    _served, port, lines, _base = exporter
    # 127.0.0.2 is this machine too, but not the address the export is declared for.
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))
    sock.connect(("127.0.0.1", port))
    sock.sendall(wire.pack_op_common(wire.OP_REQ_DEVLIST))
    try:
        answer = sock.recv(8)
    except ConnectionResetError:
        answer = b""  # closed with our request unread
    sock.close()
    assert answer == b""
    assert lines[-1] == "refused connection from 127.0.0.2: no export is declared for it"


def test_importer_errors_name_the_address_and_port(exporter):
    _served, port, _lines, _base = exporter
    with pytest.raises(_errors.UsbipError, match=r"Cannot reach 127\.0\.0\.1:%d: connection refused" % (port + 1)):
        wire.remote_devices("127.0.0.1", port + 1)


def test_offered_device_matches_selectors_by_id_port_and_vendor_product():
    offered = dict(STICK, devid=0x20003)
    assert wire.offered_matches({"id": "46f4:0001:KING0001"}, offered)
    assert wire.offered_matches({"id": "46f4:0001@2-1"}, offered)
    assert not wire.offered_matches({"id": "46f4:0001@2-2"}, offered)
    assert wire.offered_matches({"vendor_id": "46f4", "product_id": "0001", "port": "2-1"}, offered)
    assert not wire.offered_matches({"vendor_id": "0627"}, offered)
    assert wire.offered_matches({"address": "002:003"}, offered)
    assert struct.calcsize(">256s32sIIIHHHBBBBBB") == 312


def test_ensure_import_says_when_the_exporter_offers_no_such_device(exporter, tmp_path):
    _served, port, _lines, _base = exporter
    # A stand-in for vhci-hcd's sysfs directory, every port free (this machine has no vhci-hcd).
    vhci = tmp_path / "platform" / "vhci_hcd.0"
    vhci.mkdir(parents=True)
    (vhci / "status").write_text(VHCI_STATUS.replace(" 006 003 00020003 000003 3-1", " 004 000 00000000 000000 0-0"))
    with pytest.raises(_errors.UsbipError) as raised:
        importer.ensure_import("kvm1", "127.0.0.1", {"id": "abcd:0001:NOPE"}, port=port, vhci=str(vhci), directory=str(tmp_path / "imports"))
    assert str(raised.value) == (
        "kvm1 (127.0.0.1:%d) offers this host no device matching (id=abcd:0001:NOPE): not plugged in there, or not exported to this host;"
        " it offers: 2-1 46f4:0001" % port
    )


def test_the_importer_gives_an_export_back_and_the_exporter_drops_it(exporter, tmp_path):
    served, port, lines, _base = exporter
    # Nothing of the kind is exported to this peer: the table stays as it is.
    assert wire.give_back_export("127.0.0.1", "1-1", port) is False
    assert lines[-1] == "127.0.0.1 gave back 1-1, which is not exported to it"
    assert len(table.read_exports(served.path)["exports"]) == 1
    assert wire.give_back_export("127.0.0.1", "2-1", port) is True
    assert table.read_exports(served.path)["exports"] == []
    assert served.bound == {}
    assert "2-1 (46f4:0001:KING0001) given back by kvm2 (127.0.0.1), domain buildvm: export removed" in lines
    # The device went back to its own driver: usbip-host's unbind, then the driver probe (stand-in files here).
    assert (tmp_path / "sys" / "drivers" / "usbip-host" / "unbind").read_text().strip() == "2-1"
    assert (tmp_path / "sys" / "drivers_probe").read_text().strip() == "2-1"
    assert lines[-1] == "gave 2-1 (46f4:0001:KING0001) back to its driver: no longer exported"


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within %g s" % timeout
        time.sleep(0.01)


def unanswered(sock):
    """Whether nothing has come on a connection yet (neither an answer nor its end)."""
    return select.select([sock], [], [], 0)[0] == []


def test_a_watch_is_answered_the_moment_its_export_is_free_again_and_not_before(exporter):
    # usbip-host holds the device for an earlier import (status 2) until that connection's end is handled, as after
    # a broken link: an import now is refused, and a watch is held.
    served, port, lines, base = exporter
    (base / "usbip_status").write_text("2\n")
    sock = wire.open_watch("127.0.0.1", "2-1", port)
    try:
        wait_until(lambda: len(served.server.held()) == 1)
        time.sleep(0.3)  # turns of the exporter's loop, each of which answers the watches whose export is back
        assert unanswered(sock)
        assert lines[-1] == "listening on 127.0.0.1:%d" % port
        (base / "usbip_status").write_text("1\n")
        assert wire.watch_answer(sock, "127.0.0.1", "2-1", port) is True
    finally:
        sock.close()
    assert lines[-1] == "2-1 (46f4:0001:KING0001) is back: told kvm2 (127.0.0.1), domain buildvm"
    # Free already: answered at once, and nothing is logged for it.
    sock = wire.open_watch("127.0.0.1", "2-1", port)
    assert wire.watch_answer(sock, "127.0.0.1", "2-1", port) is True
    sock.close()
    assert lines[-1] == "2-1 (46f4:0001:KING0001) is back: told kvm2 (127.0.0.1), domain buildvm"
    wait_until(lambda: served.server.connections == {})


def test_a_watch_is_answered_when_the_device_is_plugged_back_in_by_the_exporter_as_it_runs(tmp_path):
    """A replug on the exporting host, with the exporter's service loop (its periodic check; no udev here): the device
    goes away, the importer watches for it by the bus id it was at, and the exporter says so once it is bound again."""
    base = fake_sysfs(tmp_path / "sys", STICK)
    export = {"id": "46f4:0001:KING0001", "selector": {"id": "46f4:0001:KING0001"}, "importer": "kvm2", "importer_address": "127.0.0.1", "domain": "buildvm"}
    with serving_process(tmp_path, [export], tmp_path / "sys") as (_process, port, journal):
        shutil.move(str(base), str(tmp_path / "unplugged"))
        away = "export of 46f4:0001:KING0001 to kvm2: not plugged in here; waiting for it"
        wait_until(lambda: away in journal.read_text())
        sock = wire.open_watch("127.0.0.1", "2-1", port)
        try:
            sock.settimeout(1.5)  # longer than the exporter's periodic check
            with pytest.raises(socket.timeout):
                sock.recv(1, socket.MSG_PEEK)
            shutil.move(str(tmp_path / "unplugged"), str(base))
            sock.settimeout(10)
            assert wire.watch_answer(sock, "127.0.0.1", "2-1", port) is True
        finally:
            sock.close()
        lines = journal.read_text().splitlines()
        assert lines[lines.index(away) + 1 :] == ["2-1 (46f4:0001:KING0001) is back: told kvm2 (127.0.0.1), domain buildvm"]


def test_a_watch_held_as_long_as_the_exporter_holds_one_is_answered_not_yet(exporter):
    served, port, lines, base = exporter
    served.server.hold_time = 0.5
    (base / "usbip_status").write_text("2\n")
    sock = wire.open_watch("127.0.0.1", "2-1", port)
    try:
        assert wire.watch_answer(sock, "127.0.0.1", "2-1", port) is False
    finally:
        sock.close()
    assert lines[-1] == "listening on 127.0.0.1:%d" % port
    wait_until(lambda: served.server.connections == {})


def test_an_import_without_vhci_hcd_says_which_module_is_missing(tmp_path):
    # A tree of the test's own: load_vhci never runs modprobe for anything but the real sysfs.
    vhci = tmp_path / "platform" / "vhci_hcd.0"
    with pytest.raises(_errors.UsbipError, match=r"vhci-hcd is not loaded"):
        sysfs.load_vhci(str(vhci))
    vhci.mkdir(parents=True)
    assert sysfs.load_vhci(str(vhci)) is False


def test_an_import_is_told_by_one_rule_its_host_by_name_else_by_address_and_port_and_its_device_by_its_id():
    record = {"vhci_port": 0, "host": "kvm2", "link_address": "10.77.0.2", "port": 3240, "busid": "2-1", "id": "46f4:0001:KING0001"}
    assert importer.is_import_of(record, {"host": "kvm2", "id": "46f4:0001:KING0001"})
    # The host's name decides when both name one: kvm3 at the same address is another host.
    assert not importer.is_import_of(record, {"host": "kvm3", "link_address": "10.77.0.2", "id": "46f4:0001:KING0001"})
    assert not importer.is_import_of(record, {"host": "kvm2", "id": "46f4:0001:OTHER"})
    # Without a host name (an intent entry written before hosts were recorded), its address and port do.
    unnamed = dict(record, host=None)
    assert importer.is_import_of(unnamed, {"link_address": "10.77.0.2", "id": "46f4:0001:KING0001"})
    assert not importer.is_import_of(unnamed, {"link_address": "10.77.0.2", "link_port": "3241", "id": "46f4:0001:KING0001"})
    assert importer.find_import([dict(record, id="46f4:0001:OTHER"), record], {"host": "kvm2", "id": "46f4:0001:KING0001"}) is record


def test_the_exporter_tells_systemd_it_is_ready_so_a_restart_returns_once_it_serves(tmp_path, monkeypatch):
    # Its unit is Type=notify: `systemctl restart` (usb_runtime) returns at READY=1, before an importer's next task.
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notify_ready()
        assert systemd.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    notify_ready()  # not under systemd: nothing to tell, and no error
