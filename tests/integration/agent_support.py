"""The reattach agent on a test host: installed and removed through the kvmhost.usb.passthrough role
(the path operators take), its journal and process, waits on what a guest sees, and a timed replug. Shared by
tests/integration/test_agent_testhost.py, tests/soak/soak_replug.py and benchmarks/replug_latency.py."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from typing import Any

from tests.testhost import TestHost
from tests.testhost.ansible import run_playbook

UNIT = "kvmhost-usb-agent.service"
PLAYBOOK = """- name: The reattach agent of the kvmhost.usb.passthrough role
  hosts: testhost
  gather_facts: false
  tasks:
    - name: Install or remove it
      ansible.builtin.include_role:
        name: kvmhost.usb.passthrough
        tasks_from: agent
"""


def set_agent(host: TestHost, enabled: bool, period: int = 60) -> str:
    """Run the role's agent tasks with usb_passthrough_agent set to ``enabled``; the playbook's output."""
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-agent-") as tmp:
        path = os.path.join(tmp, "agent.yml")
        with open(path, "w") as handle:
            handle.write(PLAYBOOK)
        process = run_playbook(host, path, {"usb_passthrough_agent": enabled, "usb_passthrough_agent_period": period})
    if process.returncode != 0:
        raise AssertionError("the agent playbook failed:\n%s\n%s" % (process.stdout, process.stderr))
    return process.stdout


# Run on the test host: prints "gone" once the guest's `info usb` no longer lists the product (the stale
# hostdev removed), then "back" once it lists it again; "timeout" when either takes too long.
WATCHER = """
import sys, time, libvirt, libvirt_qemu
domain = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
product, timeout = sys.argv[2], float(sys.argv[3])
def listed():
    text = libvirt_qemu.qemuMonitorCommand(domain, "info usb", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    return product in text
for present, word in ((False, "gone"), (True, "back")):
    deadline = time.monotonic() + timeout
    while listed() != present:
        if time.monotonic() > deadline:
            print("timeout", flush=True)
            sys.exit(1)
        time.sleep(0.02)
    print(word, flush=True)
"""


def timed_replug(
    host: TestHost, guest: str, device_id: str, product: str, port: str | None = None, timeout: float = 60.0, watch: TestHost | None = None
) -> float | None:
    """Pull a device the running guest holds out through QMP; once whatever keeps the guest's devices (the agent
    or its peer) has removed the stale hostdev, plug it back in (into ``port`` if given). The seconds from QMP
    ``device_add`` until the guest's ``info usb`` lists ``product`` again, polled every 20 ms on the test host
    that runs the guest (``watch``, default ``host``); None when the stale hostdev stayed or the device did not
    come back within ``timeout`` seconds."""
    device = host.topology.device(device_id)
    command = (watch or host).ssh_command(["python3", "-c", WATCHER, guest, product, str(timeout)])
    watcher = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        with host.qmp() as qmp:
            qmp.unplug(device_id)
            gone = watcher.stdout.readline().strip() == "gone"
            qmp.ensure_backend(device, host.run_dir)
            start = time.monotonic()
            qmp.plug(device, port)
        if not gone or watcher.stdout.readline().strip() != "back":
            return None
        return time.monotonic() - start
    finally:
        watcher.kill()
        watcher.wait()


def agent_process(host: TestHost) -> dict[str, int]:
    """The agent's main process now: ``pid``, ``rss_kib`` (VmRSS) and ``fds`` (open file descriptors)."""
    pid = int(host.ssh("systemctl", "show", "--property", "MainPID", "--value", UNIT).stdout)
    if not pid:
        raise AssertionError("%s is not running" % UNIT)
    status = host.ssh("cat", "/proc/%d/status" % pid).stdout
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M).group(1))
    fds = len(host.ssh("ls", "/proc/%d/fd" % pid).stdout.split())
    return {"pid": pid, "rss_kib": rss, "fds": fds}


def journal(host: TestHost) -> list[str]:
    """The agent's journal lines, oldest first (messages only)."""
    return host.ssh("journalctl", "-u", UNIT, "-o", "cat", "--no-pager").stdout.splitlines()


def wait_journal(host: TestHost, start: int, pattern: str, timeout: float = 60.0) -> list[str]:
    """Wait until a journal line after the first ``start`` lines matches ``pattern``; the new lines."""
    deadline = time.monotonic() + timeout
    while True:
        lines = journal(host)[start:]
        if any(re.search(pattern, line) for line in lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError("no agent line matching %r; new lines: %s" % (pattern, lines))
        time.sleep(1)


def kernel_address(host: TestHost, serial: str) -> tuple[int, int] | None:
    device = host.kernel_device(serial=serial)
    return (int(device["busnum"]), int(device["devnum"])) if device else None


def bound_in_guest(host: TestHost, guest: str, serial: str) -> list[dict[str, Any]]:
    """The guest's USB devices passed through from the host device with this serial as it is now."""
    address = kernel_address(host, serial)
    if address is None:
        return []
    path = "/dev/bus/usb/%03d/%03d" % address
    return [device for device in host.guest_usb(guest) if device["host"] and device["host"]["attached"] and device["host"]["hostdevice"] == path]


def wait_settled(host: TestHost, guest: str, serial: str, timeout: float = 120.0) -> tuple[int, int]:
    """After a storm: wait until the device keeps one kernel address for a few seconds and the guest
    holds it there; that address. (The kernel may still be enumerating the storm's last plug when
    the guest already holds an earlier one.)"""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        address = kernel_address(host, serial)
        if address is not None and address == previous and bound_in_guest(host, guest, serial):
            return address
        if time.monotonic() > deadline:
            raise AssertionError("%s did not settle in %s: kernel %s, guest %s" % (serial, guest, address, host.guest_usb(guest)))
        previous = address
        time.sleep(3)


def wait_in_guest(host: TestHost, guest: str, serial: str, timeout: float = 90.0) -> dict[str, Any]:
    """Wait until the guest holds the host device with this serial at its current address."""
    deadline = time.monotonic() + timeout
    while True:
        bound = bound_in_guest(host, guest, serial)
        if bound:
            return bound[0]
        if time.monotonic() > deadline:
            raise AssertionError("%s never came back in %s: %s" % (serial, guest, host.guest_usb(guest)))
        time.sleep(1)
