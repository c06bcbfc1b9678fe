"""Run the collection's modules and playbooks against a test host, the way an operator would.

The collection is found through ``build/collections/ansible_collections/kvmhost/usb``, a
symlink to this checkout (``make collection-link`` makes the same one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import yaml

from .paths import REPO

if TYPE_CHECKING:
    from .host import TestHost

COLLECTIONS = os.path.join(REPO, "build", "collections")
PLAYBOOKS = os.path.join(REPO, "playbooks")
# An ad-hoc result line and a recap line of the host named %s.
RESULT_LINE_OF = r"^%s \| (?P<status>[A-Z!]+)(?: \| rc=-?\d+)? => "
RECAP_OF = r"^%s\s+: ok=\d+\s+changed=(?P<changed>\d+)\s+unreachable=\d+\s+failed=(?P<failed>\d+)"
RESULT_LINE = re.compile(RESULT_LINE_OF % "testhost", re.MULTILINE)
RECAP = re.compile(RECAP_OF % "testhost", re.MULTILINE)


class AnsibleError(RuntimeError):
    """ansible printed no result for the test host."""


def collections_path() -> str:
    link = os.path.join(COLLECTIONS, "ansible_collections", "kvmhost", "usb")
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    return COLLECTIONS


def tool(name: str) -> str:
    """An Ansible command from the running Python's environment (the venv), else from PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else (shutil.which(name) or name)


def environment() -> dict[str, str]:
    return dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=collections_path(),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
        ANSIBLE_DEPRECATION_WARNINGS="0",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        # Ten runs connecting at once to a TCG guest on a busy machine: its sshd may take longer than ansible's
        # 10 s to answer ("banner exchange timed out"); a connection that never got in is safe to try again.
        ANSIBLE_TIMEOUT="60",
        ANSIBLE_SSH_RETRIES="3",
    )


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
    """Run a playbook against the test host's inventory; the CompletedProcess (output in text)."""
    command = [tool("ansible-playbook"), "-i", host.inventory, playbook]
    if extra_vars:
        command += ["-e", json.dumps(extra_vars)]
    if check:
        command.append("--check")
    return subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=1800, check=False)


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
    command = [tool("ansible-playbook"), "-i", path, os.path.join(PLAYBOOKS, playbook)] + list(options)
    process = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=1800, check=False)
    recap = RECAP.search(process.stdout)
    if not recap:
        raise AnsibleError("playbooks/%s printed no recap (rc %d):\n%s\n%s" % (playbook, process.returncode, process.stdout, process.stderr))
    process.changed = int(recap.group("changed"))  # type: ignore[attr-defined]
    process.failed = int(recap.group("failed"))  # type: ignore[attr-defined]
    return process


def play_fleet(inventory: str, playbook: str, *options: str) -> subprocess.CompletedProcess:
    """One of the collection's playbooks over an inventory of several hosts; the CompletedProcess (text) with
    ``changed`` and ``failed``: each host's counts in the recap, by name. Raises AnsibleError without a recap."""
    with open(inventory) as handle:
        names = list(yaml.safe_load(handle)["all"]["hosts"])
    command = [tool("ansible-playbook"), "-i", inventory, os.path.join(PLAYBOOKS, playbook)] + list(options)
    process = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=1800, check=False)
    process.changed, process.failed = {}, {}  # type: ignore[attr-defined]
    for name in names:
        recap = re.search(RECAP_OF % re.escape(name), process.stdout, re.MULTILINE)
        if not recap:
            raise AnsibleError("playbooks/%s printed no recap for %s (rc %d):\n%s\n%s" % (playbook, name, process.returncode, process.stdout, process.stderr))
        process.changed[name] = int(recap.group("changed"))  # type: ignore[attr-defined]
        process.failed[name] = int(recap.group("failed"))  # type: ignore[attr-defined]
    return process


def task_result(process: subprocess.CompletedProcess, task: str) -> dict[str, Any]:
    """The result a task of a playbook run printed (JSON), parsed: a debug task's, or any task's with ``-v``."""
    block = process.stdout.split("TASK [%s]" % task, 1)[1]
    return json.loads(block.split("=> ", 1)[1].split("\n\n", 1)[0])


def shown(process: subprocess.CompletedProcess, task: str) -> Any:
    """The msg a debug task of a playbook run printed, parsed."""
    return task_result(process, task)["msg"]


def usb_facts(host: TestHost, include_hubs: bool = True) -> list[dict[str, Any]]:
    """``ansible_facts.usb_devices`` of kvmhost.usb.usb_facts on the test host (hubs included by default)."""
    result = run_module(host, "kvmhost.usb.usb_facts", {"include_hubs": include_hubs})
    if result.get("failed"):
        raise AnsibleError("kvmhost.usb.usb_facts failed: %s" % result.get("msg", result))
    return result["ansible_facts"]["usb_devices"]
