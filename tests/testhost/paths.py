"""Where the test host keeps its files, and how it reports progress."""

from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BUILD_DIR = os.environ.get("KVMHOST_TESTHOST_DIR") or os.path.join(REPO, "build", "testhost")
# What every clone on the machine shares: the images (by recipe hash) and the downloaded packages.
CACHE_DIR = os.environ.get("KVMHOST_TESTHOST_CACHE") or "/var/cache/kvmhost-usb/testhost"
TOPOLOGIES_DIR = os.path.join(HERE, "topologies")

_START = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, with the seconds since this process started."""
    print("[testhost %5.1fs] %s" % (time.monotonic() - _START, message), file=sys.stderr, flush=True)
