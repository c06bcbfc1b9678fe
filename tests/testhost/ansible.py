"""Run the collection's modules and playbooks against a test host, the way an operator would.

The collection is found through ``build/collections/ansible_collections/kvmhost/usb``, a
symlink to this checkout (``make collection-link`` makes the same one); ansible-playbook runs
and their recaps are tests/lib/playbook.py's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import TYPE_CHECKING, Any

import yaml

from tests.lib.playbook import ansible_playbook, tool
from tests.lib.playbook import environment as ansible_environment

from .paths import REPO

if TYPE_CHECKING:
    from .host import TestHost

PLAYBOOKS = os.path.join(REPO, "playbooks")
# An ad-hoc result line of the host named %s.
RESULT_LINE_OF = r"^%s \| (?P<status>[A-Z!]+)(?: \| rc=-?\d+)? => "
RESULT_LINE = re.compile(RESULT_LINE_OF % "testhost", re.MULTILINE)
# Ten runs connecting at once to a TCG guest on a busy machine: its sshd may take longer than ansible's
# 10 s to answer ("banner exchange timed out"); a connection that never got in is safe to try again.
# Pipelining: a module runs in one SSH exchange instead of four (temporary directory, upload, run, clean up),
# each of them a shell started on the slow TCG host; what operators would set on a fleet too.
TESTHOST_ENVIRONMENT = {
    "ANSIBLE_DEPRECATION_WARNINGS": "0",
    "ANSIBLE_TIMEOUT": "60",
    "ANSIBLE_SSH_RETRIES": "3",
    "ANSIBLE_PIPELINING": "1",
}


class AnsibleError(RuntimeError):
    """ansible printed no result for the test host."""


def environment() -> dict[str, str]:
    return ansible_environment(TESTHOST_ENVIRONMENT)


def run_module(host: TestHost, module: str, args: dict[str, Any] | None = None, check: bool = False, diff: bool = False) -> dict[str, Any]:
    """Run one module ad hoc on the test host; its result dict plus ``status`` (SUCCESS, CHANGED, FAILED!...).

    ``failed`` is true for a failed or unreachable host; this function does not raise on a
    failed module, only when ansible printed no result at all.
    """
    return run_module_on(host.inventory, "testhost", module, args, check, diff)


def run_module_on(inventory: str, name: str, module: str, args: dict[str, Any] | None = None, check: bool = False, diff: bool = False) -> dict[str, Any]:
    """run_module() on the host ``name`` of an inventory with several hosts (the others' hostvars visible to it)."""
    command = [tool("ansible"), "-i", inventory, name, "-m", module]
    if args:
        command += ["-a", json.dumps(args)]
    if check:
        command.append("--check")
    if diff:
        command.append("--diff")
    process = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=900, check=False)
    matches = list(re.finditer(RESULT_LINE_OF % re.escape(name), process.stdout, re.MULTILINE))
    if not matches:
        raise AnsibleError("ansible %s printed no result (rc %d):\n%s\n%s" % (module, process.returncode, process.stdout, process.stderr))
    result = json.loads(process.stdout[matches[-1].end():])
    result["status"] = matches[-1].group("status")
    # The ad-hoc output leaves "failed" out of the printed result.
    result["failed"] = result["status"] in ("FAILED!", "UNREACHABLE!")
    return result


def run_playbook(host: TestHost, playbook: str, extra_vars: dict[str, Any] | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run a playbook against the test host's inventory; the CompletedProcess (output in text, ``recap`` by host)."""
    options = ["-e", json.dumps(extra_vars)] if extra_vars else []
    if check:
        options.append("--check")
    return ansible_playbook(host.inventory, playbook, *options, env=TESTHOST_ENVIRONMENT)


def play(host: TestHost, playbook: str, directory: str | os.PathLike, hostvars: dict[str, Any] | None = None, *options: str) -> subprocess.CompletedProcess:
    """One of the collection's playbooks (``converge.yml``) on a declared inventory: the test host's inventory
    with ``hostvars`` added to the host, written to ``directory``. The CompletedProcess (text) with ``changed``
    and ``failed``, the test host's counts in the recap; raises AnsibleError when there is no recap."""
    with open(host.inventory) as handle:
        inventory = yaml.safe_load(handle)
    inventory["all"]["hosts"]["testhost"].update(hostvars or {})
    path = os.path.join(directory, "inventory.yml")
    with open(path, "w") as handle:
        yaml.safe_dump(inventory, handle)
    process = ansible_playbook(path, os.path.join(PLAYBOOKS, playbook), *options, env=TESTHOST_ENVIRONMENT)
    recap = process.recap.get("testhost")  # type: ignore[attr-defined]
    if not recap:
        raise AnsibleError("playbooks/%s printed no recap (rc %d):\n%s\n%s" % (playbook, process.returncode, process.stdout, process.stderr))
    process.changed = recap["changed"]  # type: ignore[attr-defined]
    process.failed = recap["failed"]  # type: ignore[attr-defined]
    return process


def play_fleet(inventory: str, playbook: str, *options: str) -> subprocess.CompletedProcess:
    """One of the collection's playbooks over an inventory of several hosts; the CompletedProcess (text) with
    ``changed`` and ``failed``: each host's counts in the recap, by name. Raises AnsibleError without a recap."""
    with open(inventory) as handle:
        names = list(yaml.safe_load(handle)["all"]["hosts"])
    process = ansible_playbook(inventory, os.path.join(PLAYBOOKS, playbook), *options, env=TESTHOST_ENVIRONMENT)
    process.changed, process.failed = {}, {}  # type: ignore[attr-defined]
    for name in names:
        recap = process.recap.get(name)  # type: ignore[attr-defined]
        if not recap:
            raise AnsibleError("playbooks/%s printed no recap for %s (rc %d):\n%s\n%s" % (playbook, name, process.returncode, process.stdout, process.stderr))
        process.changed[name] = recap["changed"]  # type: ignore[attr-defined]
        process.failed[name] = recap["failed"]  # type: ignore[attr-defined]
    return process


def usb_facts(host: TestHost, include_hubs: bool = True) -> list[dict[str, Any]]:
    """``ansible_facts.usb_devices`` of kvmhost.usb.usb_facts on the test host (hubs included by default)."""
    result = run_module(host, "kvmhost.usb.usb_facts", {"include_hubs": include_hubs})
    if result.get("failed"):
        raise AnsibleError("kvmhost.usb.usb_facts failed: %s" % result.get("msg", result))
    return result["ansible_facts"]["usb_devices"]


def intent_status(host: TestHost, domain: str, scope: str) -> dict[str, str]:
    """The status of each device the domain's intent declares (``scope``: persistent or live), by id, from usb_facts."""
    result = run_module(host, "kvmhost.usb.usb_facts")
    [facts] = [entry for entry in result["ansible_facts"]["usb_domains"] if entry["name"] == domain]
    return dict((entry["id"], entry["status"]) for entry in facts[scope]["intent"])


def attach(host: TestHost, domain: str, devices: list, exclusive: bool = False) -> dict[str, Any]:
    """usb_attach of ``devices`` to the guest ``domain``; raises AnsibleError when it fails."""
    args = {"domain": domain, "devices": devices}
    if exclusive:
        args["exclusive"] = True
    result = run_module(host, "kvmhost.usb.usb_attach", args)
    if result["failed"]:
        raise AnsibleError("kvmhost.usb.usb_attach failed: %s" % result.get("msg", result))
    return result


def take_all(host: TestHost, domain: str) -> dict[str, Any]:
    """usb_attach of no devices, exclusive: the guest gives back every USB device it holds."""
    return attach(host, domain, [], exclusive=True)
