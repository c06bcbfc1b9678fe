# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""``python3 -m ansible_collections.kvmhost.usb.plugins.module_utils._usbip serve``: the exporter's command line."""

from __future__ import annotations

from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.exporter import main

if __name__ == "__main__":
    raise SystemExit(main())
