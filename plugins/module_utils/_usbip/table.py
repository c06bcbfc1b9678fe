# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The exports table of a host, ``/etc/kvmhost-usb/exports.json``: what the module usb_export writes and the exporter
serves, ``{"listen": address, "port": port, "exports": [{"id", "selector", "importer", "importer_address",
"domain"}]}``."""

from __future__ import annotations

import json
import os
import tempfile

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.wire import USBIP_PORT

EXPORTS_PATH = "/etc/kvmhost-usb/exports.json"
# Tests point this at a file of their own; operators have no reason to.
EXPORTS_PATH_ENV = "KVMHOST_USB_EXPORTS"


def exports_path(path=None):
    return path or os.environ.get(EXPORTS_PATH_ENV) or EXPORTS_PATH


def read_exports(path=None):
    """The exports table (``{"listen", "port", "exports": [...]}``); an empty one when there is no file."""
    path = exports_path(path)
    try:
        with open(path) as handle:
            table = json.load(handle)
    except FileNotFoundError:
        return {"listen": None, "port": USBIP_PORT, "exports": []}
    except (OSError, ValueError) as error:
        raise UsbipError("Cannot read the exports table %s: %s" % (path, error))
    table.setdefault("port", USBIP_PORT)
    table.setdefault("exports", [])
    return table


def write_exports(table, path=None):
    """Write the exports table atomically; True when its content changed."""
    path = exports_path(path)
    try:
        if read_exports(path) == table and os.path.exists(path):
            return False
    except UsbipError:
        pass  # an unreadable table is replaced
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=".exports-", dir=directory)
    try:
        with os.fdopen(descriptor, "w") as handle:
            json.dump(table, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return True
