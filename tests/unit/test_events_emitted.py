"""Who records which events: the agent (udev's devices added and removed, its passes' attaches, the replugs it gives
back, declared devices missing, hostdevs someone else attached), a converge (usb_attach, usb_detach: attached and
detached by converge, nothing in check mode) and the exporter (its refusals, rate-limited as its log). Each writer runs
as a process of its own against the run's libvirtd, with a store of the test's own."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from tests.lib import usbtree
from tests.lib.domains import URI
from tests.lib.modrun import attach, collection_root, detach
from tests.lib.trees import KINGSTON_ID, TWINS
from tests.lib.usbip_exporter import STICK, fake_sysfs, serving
from tests.lib.usbtree import sysfs_path

sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import wire  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(REPO, "tests", "lib", "agent_events_driver.py")
EXPORT = {"id": "46f4:0001:KING0001", "selector": {"id": "46f4:0001:KING0001"}, "importer": "kvm2", "importer_address": "127.0.0.1", "domain": "buildvm"}
KINGSTON_HOSTDEV = "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'><vendor id='0x0951'/><product id='0x1666'/></source></hostdev>"


def exchange(port, data, source="127.0.0.1"):
    """One request on a connection of its own from ``source``: the exporter's whole answer, b"" when it closed unanswered."""
    sock = socket.socket()
    sock.settimeout(10)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return reply
            if not chunk:
                return reply
            reply += chunk
    finally:
        sock.close()


def recorded(directory):
    path = os.path.join(str(directory), "events.jsonl")
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def about(events, domain):
    return [event for event in events if event.get("domain") == domain]


def test_the_agent_records_plugs_its_attaches_a_replug_given_back_a_device_missing_and_who_else_attached(domains, tmp_path):
    replugged = domains.define("events-replug")
    attach({"domain": replugged, "devices": ["0627:0001:42"]}, TWINS)
    put_back = domains.define("events-putback")
    attach({"domain": put_back, "devices": ["0951:1666"]}, TWINS)
    domains.lookup(put_back).detachDeviceFlags(KINGSTON_HOSTDEV, 2)  # VIR_DOMAIN_AFFECT_CONFIG
    missing = domains.define("events-missing")
    domains.set_intent(missing, '<passthrough><device id="1234:5678:GONE" serial="GONE"><selector id="1234:5678:GONE"/></device></passthrough>')
    aliased = "<hostdev mode='subsystem' type='usb'><source><vendor id='0x%s'/><product id='0x%s'/></source><alias name='ua-usb'/></hostdev>"
    other = domains.define("events-other", [aliased % ("0627", "0001")])
    announced = domains.define("events-announced", [aliased % ("0951", "1666")])
    store = tmp_path / "events"
    tree = tmp_path / "tree.umockdev"
    tree.write_text(usbtree.render(TWINS))
    command = ["umockdev-run", "-d", str(tree), "--", sys.executable, DRIVER, URI, str(store), "/sys" + sysfs_path("1-1"), other, announced]
    env = dict(os.environ, PYTHONPATH=collection_root(), KVMHOST_USB_EVENTS=str(store))
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert process.returncode == 0, process.stdout + process.stderr
    events = recorded(store)
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))

    # The pass before the replug: the Kingston put back, by the agent, in the stopped domain's persistent configuration.
    [put] = about(events, put_back)
    assert (put["kind"], put["by"], put["scopes"], put["device"]["id"]) == ("attached", "agent", ["persistent"], KINGSTON_ID)
    assert put["device"]["port"] == "2-1" and put["device"]["serial"] == "E0D55EA5741AF160B9740A81" and "attached_to" not in put["device"]

    # The replug: removed (as the tablet was), added (at its new address), given back by the re-bind, and no "attached":
    # the domain held it all along.
    plugs = [(event["kind"], event["device"]["id"], event["device"]["address"]) for event in events if event["kind"] in ("added", "removed")]
    assert plugs == [("removed", "0627:0001:42", "001:002"), ("added", "0627:0001:42", "001:007")]
    [given] = about(events, replugged)
    assert given["kind"] == "given_back" and given["device"]["id"] == "0627:0001:42" and given["device"]["address"] == "001:007"
    assert 0.2 <= given["seconds"] < 30

    # Missing once, however often it is looked at.
    [gone] = about(events, missing)
    assert gone["kind"] == "missing" and gone["device"]["id"] == "1234:5678:GONE" and gone["seconds"] >= 0.5

    # A hostdev libvirt reports added that nobody announced is someone else's; the one a converge announced is not.
    [by_other] = about(events, other)
    assert (by_other["kind"], by_other["by"]) == ("attached", "other")
    # Its vendor:product designates both twin tablets: the event names the hostdev, not a device.
    assert "device" not in by_other and (by_other["hostdev"]["vendor_id"], by_other["hostdev"]["product_id"]) == ("0627", "0001")
    assert [(event["kind"], event["by"]) for event in about(events, announced)] == [("attached", "converge")]


def test_a_converge_records_what_it_attached_and_detached_and_check_mode_nothing(domains, tmp_path):
    name = domains.define("events-converge")
    env = {"KVMHOST_USB_EVENTS": str(tmp_path / "events")}
    assert attach({"domain": name, "devices": ["0951:1666"]}, check_mode=True, env=env)["changed"] is True
    assert not (tmp_path / "events" / "events.jsonl").exists()
    assert attach({"domain": name, "devices": ["0951:1666"]}, env=env)["changed"] is True
    assert attach({"domain": name, "devices": ["0951:1666"]}, env=env)["changed"] is False
    assert detach({"domain": name, "devices": ["0951:1666"]}, env=env)["changed"] is True
    events = recorded(tmp_path / "events")
    assert [(event["seq"], event["kind"], event["by"], event["domain"], event["device"]["id"], event["scopes"]) for event in events] == [
        (1, "attached", "converge", name, KINGSTON_ID, ["persistent"]),
        (2, "detached", "converge", name, KINGSTON_ID, ["persistent"]),
    ]


def test_the_exporter_records_its_refusals_as_it_logs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMHOST_USB_EVENTS", str(tmp_path / "events"))
    fake_sysfs(tmp_path / "sys", STICK)
    now = [1000.0]
    with serving(tmp_path, [EXPORT], tmp_path / "sys") as (served, port, lines):
        served.refusals.clock = lambda: now[0]
        for _index in range(10):
            assert exchange(port, wire.pack_import_request("9-9")) is not None
        assert exchange(port, wire.OP_COMMON.pack(wire.USBIP_VERSION, wire.OP_REQ_DEVLIST, 0), source="127.0.0.2") == b""
        now[0] += 61
        deadline = time.monotonic() + 10
        while not [line for line in lines if line.startswith("9 more")] and time.monotonic() < deadline:
            time.sleep(0.05)
    events = recorded(tmp_path / "events")
    assert [(event["kind"], event["side"], event["peer"], event["reason"], event["count"]) for event in events] == [
        ("refused", "exporter", "127.0.0.1", "import not exported", 1),
        ("refused", "exporter", "127.0.0.2", "undeclared address", 1),
        ("refused", "exporter", "127.0.0.1", "import not exported", 9),
    ]
    assert events[0]["message"] == "refused the import of 9-9 by 127.0.0.1: not exported to it"


WG = """#!/bin/sh
# wg show kvmhost-usb latest-handshakes, as the test's file says it
[ "$*" = "show kvmhost-usb latest-handshakes" ] || exit 1
cat "$HANDSHAKES"
"""


def test_the_agent_records_a_link_peer_down_and_up_on_changes_only(tmp_path, monkeypatch):
    from ansible_collections.kvmhost.usb.plugins.module_utils import _agent, _events, _link

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "wg").write_text(WG)
    (tmp_path / "bin" / "wg").chmod(0o755)
    handshakes = tmp_path / "handshakes"
    monkeypatch.setenv("PATH", "%s:%s" % (tmp_path / "bin", os.environ["PATH"]))
    monkeypatch.setenv("HANDSHAKES", str(handshakes))
    settings = tmp_path / "link.json"
    peers = [
        {"name": "kvm2", "public_key": "K2", "endpoint": "10.77.0.2:51871", "tunnel_address": "10.213.0.2"},
        {"name": "kvm3", "public_key": "K3", "endpoint": "10.77.0.3:51871", "tunnel_address": "10.213.0.3"},
    ]
    settings.write_text(json.dumps({"peers": peers}))
    monkeypatch.setattr(_link, "SETTINGS_FILE", str(settings))
    now = [1_800_000_000.0]
    store = _events.Store(str(tmp_path / "events"))
    agent = _agent.Agent("test:///default", store=store, wall=lambda: now[0], out=open(os.devnull, "w"))

    def look(k2, k3):
        handshakes.write_text("K2\t%d\nK3\t%d\n" % (k2, k3))
        agent.check_link()
        return [(event["kind"], event["name"]) for event in store.read()[0]]

    # The first look tells only the peer that is down (kvm3 never shook hands); kvm2's last handshake 10 s ago is up.
    assert look(now[0] - 10, 0) == [("link_down", "kvm3")]
    assert look(now[0] - 20, 0) == [("link_down", "kvm3")]
    # kvm2 silent past WireGuard's 180 s; kvm3 back.
    now[0] += 200
    assert look(now[0] - 200, now[0] - 5) == [("link_down", "kvm3"), ("link_down", "kvm2"), ("link_up", "kvm3")]
    down = store.read()[0][1]
    assert (down["peer"], down["endpoint"]) == ("10.213.0.2", "10.77.0.2:51871") and down["handshake"].endswith("+00:00")
