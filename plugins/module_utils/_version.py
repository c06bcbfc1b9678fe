# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The collection's version, as galaxy.yml gives it (a test holds the two together): the host runtime reports it."""

from __future__ import annotations

COLLECTION_VERSION = "0.2.0"
