"""Print what a libvirt guest has on its USB buses, as JSON: run on the test host by ``guest.usb``.

``info usb`` from the guest's QEMU monitor, plus, for each passed-through host device
(QOM type usb-host), the host device QEMU is bound to and whether it counts it attached.
QEMU only notices a vanished host device on I/O, so after a replug an idle guest still
lists the old one: compare ``hostaddr`` with the test host's kernel to tell.
"""

import json
import sys

import libvirt
import libvirt_qemu

connection = libvirt.open("qemu:///system")
domain = connection.lookupByName(sys.argv[1])


class Gone(Exception):
    """QEMU answered with an error: the device went away between listing and asking (an agent at work)."""


def qmp(command, **arguments):
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, json.dumps({"execute": command, "arguments": arguments}), 0))
    if "return" not in reply:
        raise Gone(reply.get("error"))
    return reply["return"]


text = libvirt_qemu.qemuMonitorCommand(domain, "info usb", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
host_devices = {}
for child in qmp("qom-list", path="/machine/peripheral"):
    if child["type"] != "child<usb-host>":
        continue
    path = "/machine/peripheral/" + child["name"]
    try:
        host_devices[child["name"]] = {name: qmp("qom-get", path=path, property=name) for name in ("attached", "hostbus", "hostaddr", "hostdevice")}
    except Gone:
        continue
print(json.dumps({"info_usb": text, "host_devices": host_devices}))
