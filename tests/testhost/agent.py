"""The reattach agent on a test host: installed and removed through the kvmhost.usb.passthrough role (the path
operators take), its process and its journal."""

from __future__ import annotations

import os
import re
import tempfile
import time
from typing import TYPE_CHECKING

from .ansible import run_playbook

if TYPE_CHECKING:
    from .host import TestHost

UNIT = "kvmhost-usb-agent.service"
PLAYBOOK = """- name: The reattach agent of the kvmhost.usb.passthrough role
  hosts: testhost
  gather_facts: false
  tasks:
    - name: Install or remove it
      ansible.builtin.include_role:
        name: kvmhost.usb.passthrough
        tasks_from: runtime
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
