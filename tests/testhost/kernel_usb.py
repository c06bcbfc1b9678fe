"""Print the USB devices of /sys/bus/usb/devices as JSON: the kernel's view, without udev or pyudev.

Runs on the test host (``TestHost.kernel_usb_devices`` and the molecule scenario's verify).
"""

import json
import os

ROOT = "/sys/bus/usb/devices"
ATTRIBUTES = ("idVendor", "idProduct", "serial", "busnum", "devnum", "product", "manufacturer", "bDeviceClass", "speed")


def read(path):
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


devices = []
for name in sorted(os.listdir(ROOT)):
    if ":" in name:  # an interface, not a device
        continue
    entry = {"port": name}
    for attribute in ATTRIBUTES:
        entry[attribute] = read(os.path.join(ROOT, name, attribute))
    devices.append(entry)
print(json.dumps(devices))
