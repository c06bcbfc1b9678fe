"""Run a module of the collection as Ansible runs it on a target: a fresh Python process
reading its arguments from a file, here under an umockdev testbed holding a described USB tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from . import usbtree
from .domains import URI

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLLECTIONS = os.path.join(REPO, "build", "collections")


def collection_root():
    """A tree with ansible_collections/kvmhost/usb pointing at this checkout."""
    link = os.path.join(COLLECTIONS, "ansible_collections", "kvmhost", "usb")
    if not os.path.islink(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(REPO, link)
    return COLLECTIONS


def run_module(name, args, devices=None, check_mode=False, diff=False, python=(sys.executable,), python_path=(), env=None):
    """The module's JSON result. ``devices`` is a usbtree description; None means no USB at all.

    ``python`` is the interpreter command; ``python_path`` entries go before the collection root.
    The module talks to the run's own libvirtd unless ``args`` names another ``uri``.
    """
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-") as tmp:
        module_args = dict({"uri": URI}, **args)
        module_args["_ansible_check_mode"] = check_mode
        module_args["_ansible_diff"] = diff
        args_file = os.path.join(tmp, "args.json")
        with open(args_file, "w") as handle:
            json.dump({"ANSIBLE_MODULE_ARGS": module_args}, handle)
        command = list(python) + ["-m", "ansible_collections.kvmhost.usb.plugins.modules.%s" % name, args_file]
        testbed = ["umockdev-run"]
        if devices:
            tree = os.path.join(tmp, "tree.umockdev")
            with open(tree, "w") as handle:
                handle.write(usbtree.render(devices))
            testbed += ["-d", tree]
        command = testbed + ["--"] + command
        run_env = dict(os.environ, PYTHONPATH=os.pathsep.join(list(python_path) + [collection_root()]))
        run_env.update(env or {})
        process = subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=120, check=False)
    try:
        result = json.loads(process.stdout)
    except ValueError:
        raise AssertionError("module %s printed no JSON (rc %s):\n%s\n%s" % (name, process.returncode, process.stdout, process.stderr))
    result["rc"] = process.returncode
    result["warnings"] = [_message(warning) for warning in result.get("warnings", [])]
    return result


def _message(warning):
    # ansible-core 2.19 modules emit structured warnings; the controller shows their msg.
    if isinstance(warning, dict):
        return warning.get("event", warning).get("msg", str(warning))
    return warning


# No reattach agent, exporter or packages from the passthrough role here: this machine has no systemd (they run on
# the test hosts).
PLAYBOOK_HOST_DEFAULTS = {
    "ansible_python_interpreter": sys.executable,
    "ansible_connection": "local",
    "usb_passthrough_agent": False,
    "usb_passthrough_exporter": False,
    "usb_passthrough_install_packages": False,
    "usb_passthrough_uri": URI,
}


def run_playbook(directory, hosts, playbook, *options, devices, env=None):
    """ansible-playbook ``playbook`` over an inventory of ``hosts`` (name to host vars, each connecting locally), under
    umockdev with ``devices``; files in ``directory``. The CompletedProcess."""
    import yaml

    tree = os.path.join(str(directory), "tree.umockdev")
    with open(tree, "w") as handle:
        handle.write(usbtree.render(devices))
    inventory = os.path.join(str(directory), "inventory.yml")
    with open(inventory, "w") as handle:
        yaml.safe_dump({"all": {"hosts": dict((name, dict(PLAYBOOK_HOST_DEFAULTS, **variables)) for name, variables in hosts.items())}}, handle)
    command = ["umockdev-run", "-d", tree, "--", os.path.join(os.path.dirname(sys.executable), "ansible-playbook")]
    command += ["-i", inventory, str(playbook)] + list(options)
    run_env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=collection_root(),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.builtin.default",
        ANSIBLE_LOCALHOST_WARNING="0",
        **(env or {}),
    )
    return subprocess.run(command, capture_output=True, text=True, env=run_env, timeout=600, check=False, cwd=REPO)
