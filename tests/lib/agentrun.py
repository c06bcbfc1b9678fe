"""Run the reattach agent (plugins/module_utils/_agent.py) as its service runs it, here for one pass under an
umockdev testbed holding a described USB tree, against the run's own libvirtd."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from . import usbtree
from .domains import URI
from .playbook import collection_root

AGENT = "ansible_collections.kvmhost.usb.plugins.module_utils._agent"


def agent_pass(devices, *options):
    """One pass of the agent (``--once``) under umockdev: its output lines."""
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-agent-") as tmp:
        tree = os.path.join(tmp, "tree.umockdev")
        with open(tree, "w") as handle:
            handle.write(usbtree.render(devices))
        command = ["umockdev-run", "-d", tree, "--", sys.executable, "-m", AGENT, "--once", "--uri", URI] + list(options)
        env = dict(os.environ, PYTHONPATH=collection_root())
        process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert process.returncode == 0, process.stderr
    return process.stdout.splitlines()


def ours(lines, name):
    """The agent's lines about the domain ``name`` (the run's libvirtd may hold other tests' domains)."""
    return [line for line in lines if " %s " % name in line]
