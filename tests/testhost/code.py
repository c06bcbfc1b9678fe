"""The collection's own code on a test host, below the roles: a script with the module_utils it imports, or the host
runtime's zipapp. What is shipped is found by _runtime_install from the imports, as the runtime's build finds it, so
no list of files is kept here."""

from __future__ import annotations

import base64
import json
import sys

from tests.lib.playbook import collection_root

sys.path.insert(0, collection_root())

from ansible_collections.kvmhost.usb.plugins.module_utils import _runtime_install  # noqa: E402

# Run on the test host: write {path: text} (JSON on stdin) under the directory it is given.
WRITE_FILES = r"""
import json, os, sys
root = sys.argv[1]
for path, text in json.load(sys.stdin).items():
    where = os.path.join(root, path)
    os.makedirs(os.path.dirname(where), exist_ok=True)
    with open(where, "w") as handle:
        handle.write(text)
"""


def ship_script(host, directory: str, script: str) -> str:
    """``script`` and every module_utils module it imports, directly or not, into a fresh ``directory`` on ``host``
    (an ansible_collections tree: run it with PYTHONPATH=directory); the script's path there."""
    with open(script) as handle:
        source = handle.read()
    files = {}
    for name in sorted(_runtime_install.imported("__main__", source, False)):
        files.update(_runtime_install.closure(name))
    name = script.rsplit("/", 1)[-1]
    files[name] = source
    host.ssh("rm", "-rf", directory)
    host.ssh("python3", "-c", WRITE_FILES, directory, input=json.dumps(files))
    return directory + "/" + name


def ship_runtime(host, path: str) -> str:
    """The host runtime's zipapp, built from this checkout, at ``path`` on ``host`` (``python3 path exporter serve``;
    on sys.path, its modules import as the collection's); ``path``."""
    program = _runtime_install.build()
    host.ssh("sh", "-c", 'mkdir -p "$(dirname "$1")" && base64 -d > "$1"', "-", path, input=base64.b64encode(program.content).decode())
    return path
