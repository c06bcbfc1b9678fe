"""The reattach agent against faults it can be shown locally: libvirt going away and coming back (a relay in
front of the run's libvirtd is stopped and started, libvirtd itself keeps running), and the
states a pass killed half-way leaves behind, each made by hand and converged by one ``--once`` pass.

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
from tests.lib.modrun import attach, collection_root
from tests.lib.socketproxy import SocketProxy
from tests.lib.trees import KINGSTON_ID, REFERENCE, REPLUGGED, TWINS

sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils._intent import NAMESPACE, PREFIX, to_xml  # noqa: E402

KINGSTON_HOSTDEV = "<hostdev mode='subsystem' type='usb'><source startupPolicy='optional'><vendor id='0x0951'/><product id='0x1666'/></source></hostdev>"
# A period no test waits for: whatever the agent does in these tests, a reconnect or an event made it do.
PERIOD = "600"


class RunningAgent:
    """The agent as a long-running process under umockdev, its lines read as they come."""

    def __init__(self, tmp_path, uri):
        tree = tmp_path / "tree.umockdev"
        tree.write_text(usbtree.render(REFERENCE))
        env = dict(os.environ, PYTHONPATH=collection_root(), KVMHOST_USB_LOCK=str(tmp_path / "lock"))
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
