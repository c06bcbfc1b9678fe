# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host lock: one writer of passthrough changes at a time on a host, across processes (the modules, the agent)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

from typing import Any, Iterator

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import PassthroughError

LOCK_PATH = "/run/lock/kvmhost-usb.lock"
# Tests point this at their own file; operators have no reason to.
LOCK_PATH_ENV = "KVMHOST_USB_LOCK"


@contextlib.contextmanager
def host_lock(path: str | None = None, shared: bool = False) -> Iterator[None]:
    """Serialise passthrough changes on this host, across processes (flock, released on exit). A run holds it
    from its read of the domains to its last change, domain starts included: a run that read a domain shut
    off and changed only its persistent configuration while another started it would leave the device live.

    ``shared``, for check mode: wait for the changes in progress, not for other reads, and create no file."""
    path = path or os.environ.get(LOCK_PATH_ENV) or LOCK_PATH
    if not os.path.isdir(os.path.dirname(path)):
        path = os.path.join(tempfile.gettempdir(), os.path.basename(path))
    if shared and not os.path.exists(path):
        # No change was ever made under it.
        yield
        return
    try:
        descriptor = os.open(path, os.O_RDONLY if shared else os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as error:
        raise PassthroughError("Cannot open the host lock %s: %s" % (path, error))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def maybe_lock(check_mode: bool) -> Any:
    """The host lock; shared in check mode, which changes nothing but should not plan from a half-made change."""
    return host_lock(shared=check_mode)
