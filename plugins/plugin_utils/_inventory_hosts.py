# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The controller's side of selectors with ``host``: the action plugins of usb_attach, usb_detach and
usb_passthrough resolve the inventory name to the address the managed host reaches it at, then run the module.

``link_address`` is the host's ``usb_link_address``, else its ``ansible_host``, else its inventory name;
``link_port`` its ``usb_link_port`` when the inventory sets one (the exporter's port, 3240 unset); a
selector naming the managed host itself is a local selector (``host`` dropped).
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import REMOTE_FIELDS


def _variable(hostvars: Any, host: str, name: str) -> Any:
    variables = hostvars[host]
    return variables.get(name) if hasattr(variables, "get") else None


def link_address(hostvars: Any, host: str) -> str:
    for name in ("usb_link_address", "ansible_host"):
        value = _variable(hostvars, host, name)
        if value:
            return str(value)
    return host


def resolve_selector(selector: Any, hostvars: Any, current: str, where: str) -> Any:
    """The selector with ``link_address`` filled in from the inventory; a string or a selector without ``host``
    as it is. Fails for a host the inventory does not have."""
    if not isinstance(selector, dict) or not selector.get("host"):
        return selector
    host = str(selector["host"])
    if host == current:
        return dict((key, value) for key, value in selector.items() if key not in REMOTE_FIELDS)
    if host not in hostvars:
        raise AnsibleActionFail(
            "%s: host %s is not in the inventory. A selector's host is the inventory name of the KVM host the device is plugged into." % (where, host)
        )
    resolved = dict(selector)
    if not resolved.get("link_address"):
        resolved["link_address"] = link_address(hostvars, host)
    port = _variable(hostvars, host, "usb_link_port")
    if not resolved.get("link_port") and port:
        resolved["link_port"] = port
    return resolved


def resolve_devices(devices: Any, hostvars: Any, current: str, where: str) -> Any:
    if not isinstance(devices, list):
        return devices
    return [resolve_selector(selector, hostvars, current, where) for selector in devices]


class SelectorHostsAction(ActionBase):
    """Runs the module named ``MODULE`` with ``resolve_args`` applied to its arguments: by default its ``devices``
    (the selectors of usb_attach and usb_detach, for its ``domain``)."""

    MODULE = ""
    TRANSFERS_FILES = False

    def resolve_args(self, args: dict, hostvars: Any, current: str) -> dict:
        where = "Domain %s" % args["domain"] if args.get("domain") else self.MODULE.rsplit(".", 1)[-1]
        args["devices"] = resolve_devices(args.get("devices"), hostvars, current, where)
        return args

    def run(self, tmp: Any = None, task_vars: dict | None = None) -> dict:
        task_vars = task_vars or {}
        result = super().run(tmp, task_vars)
        try:
            args = self.resolve_args(dict(self._task.args), task_vars.get("hostvars") or {}, task_vars.get("inventory_hostname") or "")
        except AnsibleActionFail as error:
            result.update(error.result)
            return result
        result.update(self._execute_module(module_name=self.MODULE, module_args=args, task_vars=task_vars))
        return result
