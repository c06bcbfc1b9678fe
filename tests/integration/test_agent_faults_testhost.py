"""The reattach agent (kvmhost-usb-agent.service) survives what runs under and around it, on the real-USB test host:
libvirtd stopped and restarted (also in the middle of a replug storm, and already down when the agent starts),
the agent killed with SIGKILL in the middle of a pass, and its unit's confinement.

The agent is installed through the kvmhost.usb.passthrough role with a full pass only every 600 s: nothing in
these tests waits that long, so whatever the agent does here, an event or a reconnect made it do. The figures
(libvirtd answering to the domain converged, agent restarted to converged) are printed, not asserted.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.testhost import TestHost
from tests.testhost.agent import UNIT, journal, set_agent, wait_journal
from tests.testhost.ansible import attach, intent_status, take_all
from tests.testhost.devices import STICK
from tests.testhost.guest import hostdev_sources, kernel_address, wait_in_guest, wait_settled

GUEST = "faultvm"
PERIOD = 600
LIBVIRTD = ["libvirtd.service", "libvirtd.socket", "libvirtd-ro.socket", "libvirtd-admin.socket"]
LOCK = "/run/lock/kvmhost-usb.lock"


@pytest.fixture(scope="module")
def agent(testhost: TestHost) -> Iterator[TestHost]:
    set_agent(testhost, True, period=PERIOD)
    assert testhost.ssh("systemctl", "is-active", UNIT).stdout.strip() == "active"
    try:
        yield testhost
    finally:
        start_libvirtd(testhost)
        set_agent(testhost, False)


@pytest.fixture(scope="module")
def vm(agent: TestHost) -> Iterator[str]:
    with agent.running_guest(GUEST) as name:
        yield name


@pytest.fixture
def stick(agent: TestHost, vm: str) -> Iterator[str]:
    """The stick attached to the guest; taken back after the test."""
    attach(agent, vm, ["46f4:0001"])
    wait_in_guest(agent, vm, "KING0001")
    yield vm
    start_libvirtd(agent)
    take_all(agent, vm)


def stop_libvirtd(host: TestHost) -> None:
    # Its sockets too: a socket left listening would start libvirtd again on the agent's next try.
    host.ssh("systemctl", "stop", *LIBVIRTD)


def start_libvirtd(host: TestHost) -> float:
    """Start libvirtd; the test host's monotonic clock (s) when it was ready (Type=notify: ready means answering)."""
    host.ssh("systemctl", "start", *LIBVIRTD)
    return monotonic_property(host, "libvirtd.service", "ActiveEnterTimestampMonotonic")


def monotonic_property(host: TestHost, unit: str, name: str) -> float:
    return int(host.ssh("systemctl", "show", "-P", name, unit).stdout.strip()) / 1e6


def journal_times(host: TestHost) -> list[tuple[float, str]]:
    """The agent's journal as (monotonic seconds, message); the clock systemd's timestamps use."""
    lines = host.ssh("journalctl", "-u", UNIT, "-o", "short-monotonic", "--no-pager").stdout.splitlines()
    found = []
    for line in lines:
        match = re.match(r"^\[\s*([0-9.]+)\] \S+ [^:]+: (.*)$", line)
        if match:
            found.append((float(match.group(1)), match.group(2)))
    return found


def first_time(host: TestHost, pattern: str, after: float) -> float:
    return min(when for when, message in journal_times(host) if when >= after and re.search(pattern, message))


def print_convergence(host: TestHost, guest: str, answered: float) -> None:
    """Print the figures of a reconnect from the journal's monotonic clock: libvirtd ready, agent reconnected, attached."""
    reconnected = first_time(host, r"^connected to qemu:///system again", answered)
    attached = first_time(host, r"^attached %s to %s \(live" % (re.escape(STICK), guest), answered)
    print("libvirtd ready -> agent reconnected %.2f s -> attached %.2f s (journal, monotonic clock)" % (reconnected - answered, attached - answered))


def replug_stick(host: TestHost) -> tuple[int, int]:
    old = kernel_address(host, "KING0001")
    host.replug("stick")
    host.wait_usb(lambda devices: any(d["serial"] == "KING0001" and (int(d["busnum"]), int(d["devnum"])) != old for d in devices))
    return kernel_address(host, "KING0001")


def assert_converged(host: TestHost, guest: str, address: tuple[int, int]) -> None:
    """One live hostdev, at the device's address; one persistent; the intent kept and met."""
    assert hostdev_sources(host, guest) == ["<source><vendor id='0x46f4'/><product id='0x0001'/><address bus='%d' device='%d'/></source>" % address]
    assert len(hostdev_sources(host, guest, inactive=True)) == 1
    assert intent_status(host, guest, "live") == {STICK: "attached"}
    assert intent_status(host, guest, "persistent") == {STICK: "attached"}


def test_the_unit_is_confined_to_an_exposure_of_at_most_4(agent: TestHost) -> None:
    output = agent.ssh("systemd-analyze", "security", "--no-pager", UNIT).stdout
    [level] = re.findall(r"Overall exposure level for %s: ([0-9.]+)" % re.escape(UNIT), output)
    print("\nsystemd-analyze security %s: exposure %s" % (UNIT, level))
    assert float(level) <= 4.0, output


def test_device_replugged_while_libvirtd_is_stopped_is_back_once_libvirtd_answers(agent: TestHost, stick: str) -> None:
    start = len(journal(agent))
    stop_libvirtd(agent)
    wait_journal(agent, start, r"^lost the connection to qemu:///system .*reconnecting$")
    new = replug_stick(agent)
    time.sleep(5)  # the agent keeps retrying meanwhile, and logs nothing more
    answered = start_libvirtd(agent)
    seen = time.monotonic()
    wait_in_guest(agent, stick, "KING0001")
    print("\nlibvirtd ready -> the guest holds the stick again (seen over ssh): %.1f s" % (time.monotonic() - seen))
    lines = wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (STICK, stick, new[0], new[1]))
    # With a 600 s period, only the reconnect explains the attach.
    reconnected = [index for index, line in enumerate(lines) if re.match(r"^connected to qemu:///system again after", line)]
    attached = [index for index, line in enumerate(lines) if line.startswith("attached %s to %s (live" % (STICK, stick))]
    assert reconnected and attached and reconnected[0] < attached[0], lines
    assert not [line for line in lines if line.startswith("cannot connect")], lines
    print_convergence(agent, stick, answered)
    assert_converged(agent, stick, new)


def test_libvirtd_restarted_in_the_middle_of_a_storm(agent: TestHost, stick: str) -> None:
    start = len(journal(agent))
    device = agent.topology.device("stick")
    with agent.qmp() as qmp:
        for number in range(10):
            qmp.unplug("stick")
            qmp.ensure_backend(device, agent.run_dir)
            qmp.plug(device)
            if number == 4:
                agent.ssh("systemctl", "restart", "--no-block", "libvirtd.service")
    new = wait_settled(agent, stick, "KING0001")
    lines = wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (STICK, stick, new[0], new[1]))
    assert [line for line in lines if line.startswith("lost the connection")], lines
    assert_converged(agent, stick, new)


def test_agent_started_while_libvirtd_is_down(agent: TestHost, stick: str) -> None:
    agent.ssh("systemctl", "stop", UNIT)
    stop_libvirtd(agent)
    new = replug_stick(agent)
    start = len(journal(agent))
    agent.ssh("systemctl", "start", UNIT)
    wait_journal(agent, start, r"^cannot connect to qemu:///system: .*; retrying every")
    answered = start_libvirtd(agent)
    wait_in_guest(agent, stick, "KING0001")
    lines = wait_journal(agent, start, r"^attached %s to %s \(live, address %03d:%03d\)$" % (STICK, stick, new[0], new[1]))
    assert len([line for line in lines if line.startswith("cannot connect")]) == 1, lines
    print("\nthe agent started before libvirtd:")
    print_convergence(agent, stick, answered)
    assert_converged(agent, stick, new)


# Started before the replug, so that no pass can end before it looks; it polls /proc/locks in one process (a shell
# loop forking stat and grep fell behind on a busy machine). Prints "watching", then the PID it killed.
KILL_IN_A_PASS = r"""
import os, subprocess, sys, time
unit, lock = sys.argv[1], sys.argv[2]
pid = subprocess.run(["systemctl", "show", "-P", "MainPID", unit], capture_output=True, text=True, check=True).stdout.strip()
print("watching", flush=True)
deadline = time.monotonic() + 150
while time.monotonic() < deadline:
    try:
        inode = os.stat(lock).st_ino
    except OSError:
        inode = None
    if inode is not None:
        with open("/proc/locks") as locks:
            for line in locks:
                # "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF" (a waiter's line has "->" after the number)
                fields = line.split()
                if fields[1:5] == ["FLOCK", "ADVISORY", "WRITE", pid] and fields[5].rsplit(":", 1)[-1] == str(inode):
                    os.kill(int(pid), 9)
                    print(pid, flush=True)
                    sys.exit(0)
    time.sleep(0.002)
sys.exit(1)
"""


def test_agent_killed_in_the_middle_of_a_pass_is_restarted_and_finishes_it(agent: TestHost, stick: str) -> None:
    # The agent holds the host lock from reading the domains to its last change: killed while it holds it,
    # it is killed in the middle of the pass the replug started.
    start = len(journal(agent))
    before = agent.ssh("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip()
    command = agent.ssh_command(["python3", "-c", KILL_IN_A_PASS, UNIT, LOCK])
    with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as watcher:
        assert watcher.stdout.readline().strip() == "watching"
        agent.replug("stick")
        killed, errors = watcher.communicate(timeout=180)
    assert watcher.returncode == 0, errors
    assert killed.strip() == before
    wait_journal(agent, start, r"^watching USB devices")
    restarted = monotonic_property(agent, UNIT, "ExecMainStartTimestampMonotonic")
    assert agent.ssh("systemctl", "show", "-P", "MainPID", UNIT).stdout.strip() != before
    new = wait_settled(agent, stick, "KING0001")
    after_restart = [(when, message) for when, message in journal_times(agent) if when >= restarted]
    # What the restarted agent did tells where the kill struck: an attach (before the killed pass's attach), an
    # intent update (after it, before the intent was recorded), or nothing (after the intent).
    print("\nagent killed in a pass; after its restart (s since the restart): %s" % [("%.2f" % (when - restarted), message) for when, message in after_restart])
    assert agent.ssh("systemctl", "show", "-P", "NRestarts", UNIT).stdout.strip() != "0"
    assert_converged(agent, stick, new)
