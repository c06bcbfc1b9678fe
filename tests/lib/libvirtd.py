"""The libvirtd of one test run: started by scripts/start-libvirtd.sh with its socket and state under
build/libvirt (tests.lib.domains.URI reaches it), emptied of an earlier run's domains, and stopped
at the end. One run of a checkout at a time uses it; other checkouts have their own.

    python -m tests.lib.libvirtd start|stop   # by hand, e.g. to look at it with virsh -c URI
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys

import libvirt

from tests.lib.domains import LIBVIRT_DIR, REPO, URI, undefine

START = os.path.join(REPO, "scripts", "start-libvirtd.sh")
STOP = os.path.join(REPO, "scripts", "stop-libvirtd.sh")


class Busy(RuntimeError):
    pass


def start():
    subprocess.run([START, LIBVIRT_DIR], check=True, stdout=subprocess.DEVNULL)
    # A run that ended without stopping its daemon may have left domains behind: they are all ours.
    conn = libvirt.open(URI)
    try:
        for domain in conn.listAllDomains(0):
            undefine(conn, domain.name())
    finally:
        conn.close()


def stop():
    subprocess.run([STOP, LIBVIRT_DIR], check=True)


@contextlib.contextmanager
def turn():
    """This checkout's libvirtd to ourselves: no other run of the checkout starts or stops it meanwhile."""
    os.makedirs(LIBVIRT_DIR, exist_ok=True)
    with open(os.path.join(LIBVIRT_DIR, "lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy("another test run of %s is using its libvirtd (%s); runs of one checkout take turns" % (REPO, LIBVIRT_DIR)) from None
        yield


@contextlib.contextmanager
def running():
    """The run's libvirtd, answering at URI for the duration of the block."""
    with turn():
        try:
            start()
            yield URI
        finally:
            stop()


def main(argv):
    actions = {"start": start, "stop": stop}
    if len(argv) != 1 or argv[0] not in actions:
        sys.stderr.write("usage: python -m tests.lib.libvirtd start|stop\n")
        return 2
    with turn():
        actions[argv[0]]()
    if argv[0] == "start":
        print(URI)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
