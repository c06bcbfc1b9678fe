# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What the modules that change domains share around their work: the libraries they need on the target, the
libvirt connection, their errors and their result."""

from __future__ import annotations

from typing import Any, Callable

from ansible.module_utils.basic import missing_required_lib

from ansible_collections.kvmhost.usb.plugins.module_utils import _libvirt, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import ControllerError, LibvirtError, PassthroughError, SelectorError, UsbipError

ERRORS = (SelectorError, PassthroughError, ControllerError, LibvirtError, UsbipError)


def require_libraries(module: Any, pyudev: bool = True) -> None:
    """Fail naming the package to install when a Python library the module needs is missing on the target."""
    if pyudev and _usb.pyudev is None:
        module.fail_json(msg=missing_required_lib(_usb.PYUDEV_REQUIREMENT), exception=_usb.PYUDEV_IMPORT_ERROR)
    if _libvirt.libvirt is None:
        module.fail_json(msg=missing_required_lib(_libvirt.LIBVIRT_REQUIREMENT), exception=_libvirt.LIBVIRT_IMPORT_ERROR)


def run(module: Any, work: Callable[[Any], dict]) -> None:
    """Connect to libvirt at the module's ``uri``, ``work(conn)`` the result, and exit the module with it (its
    warnings shown, its diff only with --diff), or fail with the error's message and what it carries."""
    uri = module.params["uri"]
    try:
        conn = _libvirt.connect(uri)
        try:
            result = work(conn)
        finally:
            conn.close()
    except ERRORS as error:
        carried = dict((key, getattr(error, key)) for key in ("changed", "drift") if getattr(error, key, None) is not None)
        module.fail_json(msg=str(error), **carried)
    except _libvirt.libvirt.libvirtError as error:
        module.fail_json(msg="libvirt at %s: %s" % (uri, _libvirt.error_message(error)))
    for warning in result.pop("warnings", []):
        module.warn(warning)
    if not module._diff:
        result.pop("diff", None)
    module.exit_json(**result)
