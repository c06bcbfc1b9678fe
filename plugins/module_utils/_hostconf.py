# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The Cloudpods host agent's ``disable_usb`` switch in host.conf, read line by line."""

from __future__ import annotations

import re

DISABLE_USB_LINE = re.compile(r"^disable_usb\s*:\s*(?P<value>[^#\s]*)\s*(#.*)?$")
TRUE_WORDS = ("true", "yes", "on", "y", "1")


def passthrough_enabled(path):
    """True when host.conf says ``disable_usb: false``, None when the file is absent.

    A file without the line (or with an empty value) leaves USB passthrough disabled: that is the
    host agent's default. Only a top-level key counts; an indented one belongs to another mapping.
    """
    try:
        with open(path, "r") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    value = None
    for line in lines:
        match = DISABLE_USB_LINE.match(line)
        if match:
            value = match.group("value").strip("'\"").lower()
    if not value or value in ("null", "~"):
        return False
    return value not in TRUE_WORDS
