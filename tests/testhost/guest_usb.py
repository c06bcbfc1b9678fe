"""Print what libvirt guests have on their USB buses, as JSON: run on the test host by ``guest.usb`` and ``guest.UsbSampler``.

``guest_usb.py NAME`` prints one object: ``info usb`` from the guest's QEMU monitor, plus, for
each passed-through host device (QOM type usb-host), the host device QEMU is bound to and whether
it counts it attached. QEMU only notices a vanished host device on I/O, so after a replug an idle
guest still lists the old one: compare ``hostaddr`` with the test host's kernel to tell.

``guest_usb.py --every SECONDS NAME...`` prints one such object a line, with ``domain``, for each
guest in turn, round after round, until its standard input ends (or for at most an hour).
"""

import json
import select
import sys
import time

import libvirt
import libvirt_qemu

connection = libvirt.open("qemu:///system")


class Gone(Exception):
    """QEMU answered with an error: the device went away between listing and asking (an agent at work)."""


def qmp(domain, command, **arguments):
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps({"execute": command, "arguments": arguments}), 0))
    if "return" not in reply:
        raise Gone(reply.get("error"))
    return reply["return"]


def seen(domain):
    text = libvirt_qemu.qemuMonitorCommand(domain, "info usb", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
    host_devices = {}
    for child in qmp(domain, "qom-list", path="/machine/peripheral"):
        if child["type"] != "child<usb-host>":
            continue
        path = "/machine/peripheral/" + child["name"]
        try:
            host_devices[child["name"]] = {name: qmp(domain, "qom-get", path=path, property=name) for name in ("attached", "hostbus", "hostaddr", "hostdevice")}
        except Gone:
            continue
    return {"info_usb": text, "host_devices": host_devices}


if sys.argv[1] == "--every":
    period = float(sys.argv[2])
    domains = [(name, connection.lookupByName(name)) for name in sys.argv[3:]]
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        for name, domain in domains:
            print(json.dumps(dict(seen(domain), domain=name)), flush=True)
        if select.select([sys.stdin], [], [], period)[0] and not sys.stdin.read(1):
            break
else:
    print(json.dumps(seen(connection.lookupByName(sys.argv[1]))))
