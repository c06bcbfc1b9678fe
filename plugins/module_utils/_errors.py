# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The collection's errors, one class per kind of failure. Each message says what failed and where; the modules
report them as they are (``_module.ERRORS``). This file imports nothing of the collection, so that every other
one can raise them."""

from __future__ import annotations


class SelectorError(ValueError):
    """A selector is malformed, matches nothing, or matches more than one device."""


class HostError(Exception):
    """The host could not be read; the message says what and where."""


class LibvirtError(Exception):
    """libvirt could not be reached or refused an operation; the message is libvirt's."""


class UsbipError(Exception):
    """An export or import could not be made; the message says which host, address and device."""


class UnavailableError(UsbipError):
    """The exporter answered, but has the device away: not offered (not plugged in there, or not exported to this host)
    or refused as in use or not available. It may come back by itself; ``busid`` is its bus id there when the exporter
    named it."""

    def __init__(self, message, busid=None):
        super().__init__(message)
        self.busid = busid


class RequestError(UsbipError):
    """A USB/IP request the exporter refuses unanswered: malformed, truncated, too long or of a kind it does not know.
    ``reason`` names the kind of refusal (the exporter logs one line per kind per interval), the message says what was
    wrong."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class PassthroughError(Exception):
    """A change that must not or could not be made; the message says what was left changed, if anything."""


class ExportError(PassthroughError):
    """An export that must not be made; nothing was changed."""


class ControllerError(Exception):
    """The change cannot or could not be made; ``changed`` says whether something was changed before."""

    def __init__(self, message, changed=False):
        super().__init__(message)
        self.changed = changed


class LinkError(Exception):
    """The encrypted link between two hosts cannot be made: a tool or kernel module missing (the message names what to
    install), an address that is not the host's, or a command that failed."""


class EventsError(Exception):
    """The host's events store could not be used (its lock held too long)."""
