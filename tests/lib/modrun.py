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
from .playbook import REPO, ansible_playbook, collection_root
from .trees import REFERENCE


def run_module(name, args, devices=None, check_mode=False, diff=False, python=(sys.executable,), python_path=(), env=None, libvirt=True):
    """The module's JSON result. ``devices`` is a usbtree description; None means no USB at all.

    ``python`` is the interpreter command; ``python_path`` entries go before the collection root.
    The module talks to the run's own libvirtd unless ``args`` names another ``uri`` (``libvirt`` False: a module
    without libvirt, given no ``uri``).
    """
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-") as tmp:
        module_args = dict({"uri": URI} if libvirt else {}, **args)
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
    umockdev with ``devices``; files in ``directory``. The CompletedProcess, with ``recap`` (tests.lib.playbook)."""
    import yaml

    tree = os.path.join(str(directory), "tree.umockdev")
    with open(tree, "w") as handle:
        handle.write(usbtree.render(devices))
    inventory = os.path.join(str(directory), "inventory.yml")
    with open(inventory, "w") as handle:
        yaml.safe_dump({"all": {"hosts": dict((name, dict(PLAYBOOK_HOST_DEFAULTS, **variables)) for name, variables in hosts.items())}}, handle)
    return ansible_playbook(inventory, playbook, *options, env=env, wrapper=["umockdev-run", "-d", tree, "--"], timeout=600, cwd=REPO)


def attach(args, devices=tuple(REFERENCE), **options):
    return run_module("usb_attach", args, devices, **options)


def detach(args, devices=tuple(REFERENCE), **options):
    return run_module("usb_detach", args, devices, **options)


def failed(result, *fragments):
    """The message of a module run that failed, with each of ``fragments`` in it."""
    assert result["rc"] != 0 and result.get("failed") is True, result
    for fragment in fragments:
        assert fragment in result["msg"], result["msg"]
    return result["msg"]


def without_library(tmp_path, name):
    """An environment in which ``import name`` fails on the target, as on a host without the package."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / ("%s.py" % name)).write_text("raise ImportError(%r)\n" % ("No module named '%s'" % name))
    return {"PYTHONPATH": os.pathsep.join([str(shim), collection_root()])}
