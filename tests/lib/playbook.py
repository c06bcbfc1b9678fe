"""ansible-playbook with this checkout as the kvmhost.usb collection, and what a run printed: each host's recap
and a task's result. The unit tier, the test hosts (tests/testhost/ansible.py) and the benchmarks run it so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, "build", "collections")
# A host's line in the PLAY RECAP: "kvm1   : ok=5    changed=1    unreachable=0    failed=0    skipped=2 ...".
RECAP = re.compile(r"^(?P<host>\S+)\s+: (?P<counts>ok=\d+(?:\s+\w+=\d+)*)\s*$", re.M)


def collection_root():
    """A tree with ansible_collections/kvmhost/usb pointing at this checkout (``make collection-link`` makes the same)."""
    link = os.path.join(COLLECTIONS, "ansible_collections", "kvmhost", "usb")
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    return COLLECTIONS


def tool(name):
    """An Ansible command from the running Python's environment (the venv), else from PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), name)
    return candidate if os.path.exists(candidate) else (shutil.which(name) or name)


def environment(extra=None):
    """The environment of an Ansible command: this checkout's collection, plain output, ``extra`` on top."""
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=collection_root(),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    env.update(extra or {})
    return env


def ansible_playbook(inventory, playbook, *options, env=None, wrapper=(), timeout=1800, cwd=None):
    """ansible-playbook ``playbook`` over ``inventory`` with ``options``, run under the ``wrapper`` command if any (such
    as umockdev-run), ``env`` added to environment(). The CompletedProcess (text) with ``recap``: recap() of its output."""
    command = list(wrapper) + [tool("ansible-playbook"), "-i", str(inventory), str(playbook)] + list(options)
    process = subprocess.run(command, capture_output=True, text=True, env=environment(env), timeout=timeout, check=False, cwd=cwd)
    process.recap = recap(process.stdout)  # type: ignore[attr-defined]
    return process


def recap(output):
    """Each host's counts in the PLAY RECAP of a playbook run's output, by name: ``{"ok": 5, "changed": 1, ...}``
    (ok, changed, unreachable, failed, skipped, rescued, ignored)."""
    return dict(
        (match.group("host"), dict((key, int(value)) for key, value in re.findall(r"(\w+)=(\d+)", match.group("counts"))))
        for match in RECAP.finditer(output)
    )


def task_result(process, task):
    """The result a task of a playbook run printed (JSON), parsed: a debug task's, or any task's with ``-v``."""
    block = process.stdout.split("TASK [%s]" % task, 1)[1]
    return json.loads(block.split("=> ", 1)[1].split("\n\n", 1)[0])


def shown(process, task):
    """The msg a debug task of a playbook run printed, parsed."""
    return task_result(process, task)["msg"]
