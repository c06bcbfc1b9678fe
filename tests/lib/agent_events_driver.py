"""Drive the reattach agent's Agent in one process under umockdev-run, for its events (tests/unit/test_events_emitted.py).

The netlink uevents of a running umockdev testbed need its in-process API; here the agent's udev handler is given the
real pyudev devices of the testbed instead, and the replug is made in the testbed's sysfs (the tablet's device number
changes), as the kernel would show it. Usage: agent_events_driver URI STORE TABLET_SYS_PATH UNANNOUNCED ANNOUNCED, where
the last two are domains with a hostdev under the user alias ``ua-usb``.
"""

from __future__ import annotations

import os
import sys
import time

import pyudev

from ansible_collections.kvmhost.usb.plugins.module_utils import _agent, _events, _libvirt

uri, directory, tablet, unannounced, announced = sys.argv[1:6]
store = _events.Store(directory)  # the one the planner announces in too (KVMHOST_USB_EVENTS)
agent = _agent.Agent(uri, store=store, missing_after=0.5, link_check=0, out=sys.stdout)
agent.setup()
agent.pass_()
context = pyudev.Context()
agent.device_event("remove", pyudev.Devices.from_sys_path(context, tablet))
with open(os.environ["UMOCKDEV_DIR"] + tablet + "/devnum", "w") as handle:
    handle.write("7\n")
time.sleep(0.2)
agent.device_event("add", pyudev.Devices.from_sys_path(context, tablet))
agent.pass_()
time.sleep(0.6)
agent.check_missing()
agent.check_missing()
# Two hostdevs libvirt reports added: one a converge announced, one nobody did.
_agent.ANNOUNCED_WITHIN = 0.3
conn = _libvirt.libvirt.open(uri)
_events.emit("attached", domain=announced, by="converge", device={"id": "0951:1666:E0D55EA5741AF160B9740A81"}, store=store)
agent.on_device_added(conn, conn.lookupByName(announced), "ua-usb", None)
agent.on_device_added(conn, conn.lookupByName(unannounced), "ua-usb", None)
time.sleep(0.4)
agent.check_announced()
