"""The reattach agent on a test host: installed and removed through the kvmhost.usb.passthrough role
(the path operators take), its journal, and waits on what a guest sees. Shared by
tests/integration/test_agent_testhost.py and benchmarks/replug_latency.py."""

from __future__ import annotations

import os
import re
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
