# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The controller's side of selectors with ``host``: the action plugins of usb_attach, usb_detach and
usb_passthrough resolve the inventory name to the address the managed host reaches it at, then run the module.

``link_address`` is the host's ``usb_link_address``, else its ``ansible_host``, else its inventory name. The address a
selector is resolved to, where the importer connects, is the exporting host's *USB/IP address*: its tunnel address
(``usb_link_tunnel_address``, else derived from its link address in ``usb_link_tunnel_network``), or its link address
when its ``usb_link_encryption`` is ``none``. ``link_port`` is its ``usb_link_port`` when the inventory sets one (the
exporter's port, 3240 unset); a selector naming the managed host itself is a local selector (``host`` dropped).
"""

from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.kvmhost.usb.plugins.module_utils import _link
from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import REMOTE_FIELDS
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LinkError

ENCRYPTIONS = ("wireguard", "none")


def variable(hostvars: Any, host: str, name: str) -> Any:
    variables = hostvars[host]
    return variables.get(name) if hasattr(variables, "get") else None


def link_address(hostvars: Any, host: str) -> str:
    for name in ("usb_link_address", "ansible_host"):
        value = variable(hostvars, host, name)
        if value:
            return str(value)
    return host


def encryption(hostvars: Any, host: str) -> str:
    """The host's ``usb_link_encryption``: ``wireguard`` unless the inventory says ``none``."""
    return str(variable(hostvars, host, "usb_link_encryption") or "wireguard")


def tunnel_network(hostvars: Any, host: str) -> str:
    return str(variable(hostvars, host, "usb_link_tunnel_network") or _link.TUNNEL_NETWORK)


def tunnel_address(hostvars: Any, host: str) -> str:
    """The host's tunnel address; LinkError when it can be neither read nor derived."""
    override = variable(hostvars, host, "usb_link_tunnel_address")
    if override:
        return _link.check_address(str(override), "usb_link_tunnel_address of %s:" % host)
    try:
        return _link.tunnel_address(link_address(hostvars, host), tunnel_network(hostvars, host))
    except LinkError as error:
        raise LinkError("%s: %s" % (host, error)) from None


def usbip_address(hostvars: Any, host: str) -> str:
    """Where the host's exporter is reached for USB/IP: its tunnel address, its link address without encryption."""
    return tunnel_address(hostvars, host) if encryption(hostvars, host) == "wireguard" else link_address(hostvars, host)


def unknown_host(where: str, host: Any) -> str:
    """The sentence for a selector, in ``where``, naming a host the inventory does not have."""
    return "%s: host %s is not in the inventory. A selector's host is the inventory name of the KVM host the device is plugged into." % (where, host)


def unknown_hosts(hostvars: Any, selectors: Any, where: str) -> list:
    """A sentence for each of ``selectors`` that names a host the inventory does not have."""
    return [
        unknown_host(where, selector["host"])
        for selector in selectors or []
        if isinstance(selector, dict) and selector.get("host") and str(selector["host"]) not in hostvars
    ]


def local_selector(selector: Any, current: str) -> Any:
    """The selector as the host ``current`` declares it: a selector whose ``host`` names ``current`` is local (its
    remote fields dropped); any other as it is."""
    if isinstance(selector, dict) and selector.get("host") and str(selector["host"]) == current:
        return dict((key, value) for key, value in selector.items() if key not in REMOTE_FIELDS)
    return selector


def resolve_selector(selector: Any, hostvars: Any, current: str, where: str) -> Any:
    """The selector with ``link_address`` filled in from the inventory; a string, a selector without ``host`` or
    naming ``current`` as ``local_selector`` makes it. Fails for a host the inventory does not have."""
    selector = local_selector(selector, current)
    if not isinstance(selector, dict) or not selector.get("host"):
        return selector
    host = str(selector["host"])
    if host not in hostvars:
        raise AnsibleActionFail(unknown_host(where, host))
    resolved = dict(selector)
    if not resolved.get("link_address"):
        try:
            resolved["link_address"] = usbip_address(hostvars, host)
        except LinkError as error:
            raise AnsibleActionFail("%s: %s" % (where, error)) from None
    port = variable(hostvars, host, "usb_link_port")
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
