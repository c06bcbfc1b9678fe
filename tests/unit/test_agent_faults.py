"""The reattach agent against faults it can be shown locally: libvirt going away and coming back (a relay in
front of the run's libvirtd is stopped and started, libvirtd itself keeps running), a device another host exports
kept away by its exporter (the collection's exporter on 127.0.0.1, over a stand-in sysfs tree) until it says it is
back, and the states a pass killed half-way leaves behind, each made by hand and converged by one ``--once`` pass.

On the test host the same faults happen for real (libvirtd restarted, the agent killed with SIGKILL):
tests/integration/test_agent_faults_testhost.py.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

import libvirt
import pytest

from tests.lib import usbtree
from tests.lib.agentrun import AGENT, agent_pass, ours
from tests.lib.domain_xml import hostdev, hostdevs, intent, metadata
from tests.lib.domains import URI
from tests.lib.modrun import attach, collection_root
from tests.lib.socketproxy import SocketProxy
from tests.lib.trees import KINGSTON_ID, REFERENCE, REPLUGGED, TWINS
from tests.lib.usbip_exporter import STICK, fake_sysfs, serving
from tests.lib.usbtree import vhci_hcd

sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import RequestError  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.module_utils._intent import NAMESPACE, PREFIX, to_xml  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import wire  # noqa: E402

KINGSTON_HOSTDEV = "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'><vendor id='0x0951'/><product id='0x1666'/></source></hostdev>"
# A period no test waits for: whatever the agent does in these tests, a reconnect or an event made it do.
PERIOD = "600"


class RunningAgent:
    """The agent as a long-running process under umockdev, its lines read as they come."""

    def __init__(self, tmp_path, uri, devices=None, env=None):
        tree = tmp_path / "tree.umockdev"
        tree.write_text(usbtree.render(REFERENCE if devices is None else devices))
        env = dict(os.environ, PYTHONPATH=collection_root(), KVMHOST_USB_LOCK=str(tmp_path / "lock"), **(env or {}))
        command = ["umockdev-run", "-d", str(tree), "--", sys.executable, "-u", "-m", AGENT, "--uri", uri, "--period", PERIOD]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.queue.put(line.rstrip("\n"))

    def wait_line(self, pattern, timeout=60.0):
        """Wait for the next line that matches ``pattern``; the lines read up to it."""
        deadline = time.monotonic() + timeout
        start = len(self.lines)
        while True:
            try:
                line = self.queue.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError("no agent line matching %r; its lines: %s" % (pattern, self.lines))
            self.lines.append(line)
            if re.search(pattern, line):
                return self.lines[start:]

    def stop(self):
        self.process.terminate()
        self.process.wait(30)


@pytest.fixture
def proxy(tmp_path):
    relay = SocketProxy(str(tmp_path / "libvirt.sock"))
    yield relay
    relay.stop()


def take_hostdev_away(domains, name):
    domains.lookup(name).detachDeviceFlags(KINGSTON_HOSTDEV, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    assert hostdevs(domains.inactive(name)) == []


def test_agent_started_while_libvirt_is_down_catches_up_as_soon_as_it_answers(domains, proxy, tmp_path):
    name = domains.define("agent-down-at-start")
    attach({"domain": name, "devices": ["0951:1666"]})
    take_hostdev_away(domains, name)
    agent = RunningAgent(tmp_path, proxy.uri)
    try:
        agent.wait_line(r"^cannot connect to ")
        proxy.start()
        lines = agent.wait_line(r"^attached %s to %s \(persistent, by vendor:product\)$" % (KINGSTON_ID, name))
        assert re.match(r"^connected to .* again after [0-9.]+ s; catching up$", lines[0]), lines
    finally:
        agent.stop()
    assert hostdevs(domains.inactive(name)) == [hostdev("0951", "1666")]
    # One line per outage, however many retries it took.
    assert len([line for line in agent.lines if line.startswith("cannot connect")]) == 1, agent.lines


def test_agent_reconnects_after_libvirt_went_away_and_catches_up_at_once(domains, proxy, tmp_path):
    name = domains.define("agent-reconnect")
    attach({"domain": name, "devices": ["0951:1666"]})
    take_hostdev_away(domains, name)
    proxy.start()
    agent = RunningAgent(tmp_path, proxy.uri)
    try:
        agent.wait_line(r"^attached %s to %s " % (KINGSTON_ID, name))
        proxy.stop()
        agent.wait_line(r"^lost the connection to .*; reconnecting$")
        # What changed while libvirt was away (here by hand, on the host a replug) waits for the reconnect.
        take_hostdev_away(domains, name)
        time.sleep(3)  # several retries fail meanwhile
        proxy.start()
        lines = agent.wait_line(r"^attached %s to %s \(persistent, by vendor:product\)$" % (KINGSTON_ID, name))
        assert re.match(r"^connected to .* again after [0-9.]+ s; catching up$", lines[0]), lines
    finally:
        agent.stop()
    assert hostdevs(domains.inactive(name)) == [hostdev("0951", "1666")]
    connection_lines = [line for line in agent.lines if re.match(r"^(lost the connection|cannot connect|connected to)", line)]
    assert len(connection_lines) == 2, agent.lines


STICK_ID = "46f4:0001:KING0001"


@pytest.fixture
def kvm1_exporter(tmp_path):
    """kvm1's exporter, exporting its stick (bus id 2-1) to this host (kvm2, 127.0.0.1), the stick in use by an
    earlier import (usbip-host's status 2, as after a broken connection until the kernel frees it): an import now is
    refused as busy. ``(exporter, port, its lines, the stick's stand-in sysfs directory)``."""
    base = fake_sysfs(tmp_path / "kvm1-sys", STICK)
    (base / "usbip_status").write_text("2\n")
    export = {"id": STICK_ID, "selector": {"id": STICK_ID}, "importer": "kvm2", "importer_address": "127.0.0.1", "domain": "buildvm"}
    directory = tmp_path / "kvm1"
    directory.mkdir()
    with serving(directory, [export], tmp_path / "kvm1-sys") as (served, port, lines):
        yield served, port, lines, base


def importing_agent(domains, tmp_path, suffix, port):
    """A domain whose intent names the stick of kvm1, and the agent of a host with vhci-hcd (every port free):
    ``(domain name, agent)``."""
    name = domains.define(suffix)
    domains.set_intent(
        name,
        '<passthrough><device id="%s" serial="KING0001" host="kvm1" link_address="127.0.0.1" link_port="%d">'
        '<selector id="%s"/></device></passthrough>' % (STICK_ID, port, STICK_ID),
    )
    return name, RunningAgent(tmp_path, URI, devices=list(REFERENCE) + [vhci_hcd({})], env={"KVMHOST_USB_IMPORTS": str(tmp_path / "imports")})


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within %g s" % timeout
        time.sleep(0.01)


def test_an_import_away_is_made_again_the_moment_its_exporter_says_it_is_back(domains, tmp_path, kvm1_exporter):
    """The agent's import is refused as busy: it watches for the stick on kvm1's exporter, and makes its pass when the
    exporter says the stick is back, not at its next timed retry. What the pass imports cannot become a device here (the
    stand-in vhci-hcd has no SuperSpeed port, and no kernel behind it); the exporter's hand-over shows the import was
    made."""
    served, port, exporter_lines, base = kvm1_exporter
    name, agent = importing_agent(domains, tmp_path, "agent-watch", port)
    try:
        busy = "cannot import %s from kvm1 (127.0.0.1) for %s: 127.0.0.1:%d refused to export 2-1 to this host: busy; retrying" % (STICK_ID, name, port)
        agent.wait_line("^%s$" % re.escape(busy))
        wait_until(lambda: len(served.server.held()) == 1)
        # The agent's first timed retry comes and goes (the exporter counts the import it refuses again), so that the
        # next one is 2 s away when the stick is freed.
        wait_until(lambda: served.refusals.kinds["import unavailable"][1] >= 1)
        (base / "usbip_status").write_text("1\n")
        lines = agent.wait_line("^cannot import %s .*: No free ss port" % STICK_ID)
    finally:
        agent.stop()
    assert lines == [
        "%s is back on kvm1 (127.0.0.1); importing it again" % STICK_ID,
        "cannot import %s from kvm1 (127.0.0.1) for %s: No free ss port on vhci-hcd (all 0 in use); retrying" % (STICK_ID, name),
    ]
    assert agent.lines.index(busy) < agent.lines.index(lines[0])
    back = "2-1 (%s) is back: told kvm2 (127.0.0.1), domain buildvm" % STICK_ID
    exported = "exported 2-1 (%s) to kvm2 (127.0.0.1), domain buildvm" % STICK_ID
    assert exporter_lines.index("refused the import of 2-1 by 127.0.0.1: in use by an earlier import") < exporter_lines.index(back)
    assert exporter_lines.index(back) < exporter_lines.index(exported)
    assert (base / "usbip_sockfd").read_text().strip().isdigit()


def test_the_watch_ends_when_no_domain_names_the_device_any_more(domains, tmp_path, kvm1_exporter):
    served, port, _exporter_lines, _base = kvm1_exporter
    name, agent = importing_agent(domains, tmp_path, "agent-watch-ends", port)
    try:
        agent.wait_line("^cannot import %s from kvm1 " % STICK_ID)
        wait_until(lambda: len(served.server.held()) == 1)
        domains.remove(name)
        # The next timed pass finds no domain naming the stick: the agent forgets its failing import and ends the watch.
        wait_until(lambda: served.server.connections == {})
    finally:
        agent.stop()
    assert not [line for line in agent.lines if line.startswith("cannot watch")], agent.lines


def test_an_exporter_that_does_not_know_the_watch_leaves_the_agent_to_its_timed_retries(domains, tmp_path, kvm1_exporter):
    """An exporter of an older version closes the connection of a request it does not know: the agent says so once and
    makes its passes on its timer, which import the stick once it is free."""
    served, port, exporter_lines, base = kvm1_exporter
    answer = served.server.answer

    def older(peer, code, busid, sock):
        if code == wire.OP_REQ_WATCH:
            raise RequestError("unknown request", "unknown request code 0x%04x" % code)
        return answer(peer, code, busid, sock)

    served.server.answer = older
    _name, agent = importing_agent(domains, tmp_path, "agent-nowatch", port)
    try:
        agent.wait_line(
            r"^cannot watch for %s on kvm1 \(127\.0\.0\.1\): 127\.0\.0\.1:%d closed the connection on the watch of 2-1 without an answer \(an"
            r" exporter of an older version, stopped, or declaring no export for this host\); retrying on a timer only$" % (STICK_ID, port)
        )
        (base / "usbip_status").write_text("1\n")
        lines = agent.wait_line("^cannot import %s .*: No free ss port" % STICK_ID)
    finally:
        agent.stop()
    assert not [line for line in agent.lines if " is back on " in line], agent.lines
    assert len([line for line in agent.lines if line.startswith("cannot watch")]) == 1, agent.lines
    assert "exported 2-1 (%s) to kvm2 (127.0.0.1), domain buildvm" % STICK_ID in exporter_lines
    assert exporter_lines[2] == "refused the import of 2-1 by 127.0.0.1: in use by an earlier import"


# A pass killed half-way. The agent re-binds the tablet (serial 42) after its replug from 001:002 to 001:007 in
# this order: detach the old hostdev, attach the new one, record the intent. Each state in between, made by hand
# with the libvirt calls the pass makes, is finished by the next pass into what an uninterrupted pass leaves.
OLD_HOSTDEV = (
    "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'>"
    "<vendor id='0x0627'/><product id='0x0001'/><address bus='1' device='2'/></source></hostdev>"
)
NEW_HOSTDEV = OLD_HOSTDEV.replace("device='2'", "device='7'")
REBOUND = {"serial": "42", "port": "1-1", "address": "001:007"}
REBOUND_INTENT = intent(("0627:0001:42", {"id": "0627:0001:42"}, REBOUND))


def _detached(handle):
    handle.detachDeviceFlags(OLD_HOSTDEV, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _attached(handle):
    _detached(handle)
    handle.attachDeviceFlags(NEW_HOSTDEV, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _intent_first(handle):
    # The reverse order, which the agent never takes: the intent already records the new address, the hostdev is old.
    entries = [{"id": "0627:0001:42", "selector": {"id": "0627:0001:42"}, **REBOUND}]
    handle.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, to_xml(entries), PREFIX, NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_CONFIG)


@pytest.mark.parametrize(
    "half_done",
    [_detached, _attached, _intent_first],
    ids=["old-hostdev-detached", "new-hostdev-attached-intent-not-recorded", "intent-recorded-hostdev-not-rebound"],
)
def test_the_pass_after_a_killed_one_finishes_it(domains, half_done):
    name = domains.define("agent-half-" + half_done.__name__.strip("_").replace("_", "-"))
    attach({"domain": name, "devices": ["0627:0001:42"]}, TWINS)
    assert hostdevs(domains.inactive(name)) == [hostdev("0627", "0001", 1, 2)]
    half_done(domains.lookup(name))
    lines = ours(agent_pass(REPLUGGED), name)
    assert not [line for line in lines if "failed" in line], lines
    xml = domains.inactive(name)
    assert hostdevs(xml) == [hostdev("0627", "0001", 1, 7)]
    assert metadata(xml) == REBOUND_INTENT
    assert ours(agent_pass(REPLUGGED), name) == []
    assert domains.inactive(name) == xml
