"""Replugs of a test host's device through QMP that a test or a benchmark times or piles up: one timed replug
under a running guest, a storm of quick ones."""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING

from .agent import UNIT

if TYPE_CHECKING:
    from .host import TestHost

# Run on the test host: prints "gone" once the guest's `info usb` no longer lists the product (the stale
# hostdev removed), then "back" once it lists it again; "timeout" when either takes too long.
WATCHER = """
import sys, time, libvirt, libvirt_qemu
domain = libvirt.open("qemu:///system").lookupByName(sys.argv[1])
product, timeout = sys.argv[2], float(sys.argv[3])
def listed():
    text = libvirt_qemu.qemuMonitorCommand(domain, "info usb", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    return product in text
for present, word in ((False, "gone"), (True, "back")):
    deadline = time.monotonic() + timeout
    while listed() != present:
        if time.monotonic() > deadline:
            print("timeout", flush=True)
            sys.exit(1)
        time.sleep(0.02)
    print(word, flush=True)
"""


def timed_replug(
    host: TestHost, guest: str, device_id: str, product: str, port: str | None = None, timeout: float = 60.0, watch: TestHost | None = None
) -> float | None:
    """Pull a device the running guest holds out through QMP; once whatever keeps the guest's devices (the agent
    or its peer) has removed the stale hostdev, plug it back in (into ``port`` if given). The seconds from QMP
    ``device_add`` until the guest's ``info usb`` lists ``product`` again, polled every 20 ms on the test host
    that runs the guest (``watch``, default ``host``); None when the stale hostdev stayed or the device did not
    come back within ``timeout`` seconds."""
    device = host.topology.device(device_id)
    command = (watch or host).ssh_command(["python3", "-c", WATCHER, guest, product, str(timeout)])
    watcher = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        with host.qmp() as qmp:
            qmp.unplug(device_id)
            gone = watcher.stdout.readline().strip() == "gone"
            qmp.ensure_backend(device, host.run_dir)
            start = time.monotonic()
            qmp.plug(device, port)
        if not gone or watcher.stdout.readline().strip() != "back":
            return None
        return time.monotonic() - start
    finally:
        watcher.kill()
        watcher.wait()


def storm(host: TestHost, device_id: str, count: int, restart_after: int | None = None) -> None:
    """``count`` replugs of a device as fast as QEMU takes them; optionally restart the agent after some."""
    device = host.topology.device(device_id)
    with host.qmp() as qmp:
        for number in range(count):
            qmp.unplug(device_id)
            qmp.ensure_backend(device, host.run_dir)
            qmp.plug(device)
            if restart_after is not None and number + 1 == restart_after:
                host.ssh("systemctl", "restart", "--no-block", UNIT)
