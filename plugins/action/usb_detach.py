# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import SelectorHostsAction


class ActionModule(SelectorHostsAction):
    MODULE = "kvmhost.usb.usb_detach"
