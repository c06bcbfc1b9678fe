# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import SelectorHostsAction, resolve_devices


class ActionModule(SelectorHostsAction):
    MODULE = "kvmhost.usb.usb_passthrough"

    def resolve_args(self, args, hostvars, current):
        domains = args.get("domains")
        if isinstance(domains, dict):
            args["domains"] = dict(
                (
                    (name, dict(settings, devices=resolve_devices(settings.get("devices"), hostvars, current, "Domain %s" % name)))
                    if isinstance(settings, dict) and "devices" in settings
                    else (name, settings)
                )
                for name, settings in domains.items()
            )
        return args
