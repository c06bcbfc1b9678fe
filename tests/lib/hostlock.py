"""The host lock the modules take (a flock on one file): whether a run is waiting for it."""

from __future__ import annotations

import os
import time


def lock_waiters(path):
    """How many flock requests on the file at ``path`` are blocked, from /proc/locks ("->" marks a waiter)."""
    inode = ":%d " % os.stat(path).st_ino
    with open("/proc/locks") as handle:
        return len([line for line in handle if "->" in line and inode in line])


def wait_for_lock_waiter(path, run, results, timeout=60.0):
    """Wait until the module run in the thread ``run`` waits for the host lock at ``path`` (held by the test)."""
    deadline = time.monotonic() + timeout
    while not lock_waiters(path):
        assert time.monotonic() < deadline and run.is_alive(), "the run did not wait for the host lock: %s" % results
        time.sleep(0.1)
