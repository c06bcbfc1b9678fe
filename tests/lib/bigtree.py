"""A large, realistic USB tree for the enumeration benchmark and its equivalence test.

``fleet_host(200)`` describes a host with two xHCI controllers (four buses: two USB 2.0,
two USB 3.x), hubs nested up to four tiers deep and, behind them, the mix a KVM host that
passes USB through tends to carry: storage sticks and SSDs (uas and usb-storage), keyboards,
mice, receivers, serial adapters (FTDI, CP210x, CH340, PL2303, CDC ACM), smart-card readers,
security keys, webcams, Bluetooth, UPSes and licence dongles. Some have serials, some not,
some share a serial (cheap CP210x and flash disks), some serials need percent-encoding,
some interfaces have no driver bound, some devices carry no strings at all.

The description is deterministic: same input, same tree. Fields are those of usbtree.
Four tiers of hubs hold up to about 260 devices; beyond that fleet_host raises ValueError.
``fleet_host(count, kinds=(...))`` places only the named kinds of leaves (the catalogue names
below, such as "ftdi" or "t7"), for example only kinds whose every device has a serial of its own.
"""

from __future__ import annotations

from collections import deque

from .usbtree import root_hub

# (template name, fields). Interfaces are (class hex, driver or None).
_HUBS = {
    "usb2": {
        "vendor_id": "05e3", "product_id": "0608", "product": "USB2.0 Hub",
        "vendor_db": "Genesys Logic, Inc.", "model_db": "Hub", "speed": "480", "version": " 2.00",
        "device_class": "09", "interfaces": [("09", "hub")], "ports": 4,
    },
    "usb2_7": {
        "vendor_id": "1a40", "product_id": "0201", "product": "USB 2.0 Hub [MTT]",
        "vendor_db": "Terminus Technology Inc.", "model_db": "FE 2.1 7-port Hub", "speed": "480",
        "version": " 2.00", "device_class": "09", "interfaces": [("09", "hub")], "ports": 7,
    },
    "usb3": {
        "vendor_id": "2109", "product_id": "0817", "manufacturer": "VIA Labs, Inc.", "product": "USB3.0 Hub",
        "vendor_db": "VIA Labs, Inc.", "speed": "5000", "version": " 3.10",
        "device_class": "09", "interfaces": [("09", "hub")], "ports": 4,
    },
    "usb3_7": {
        "vendor_id": "05e3", "product_id": "0626", "manufacturer": "GenesysLogic", "product": "USB3.1 Hub",
        "vendor_db": "Genesys Logic, Inc.", "model_db": "Hub", "speed": "5000", "version": " 3.20",
        "device_class": "09", "interfaces": [("09", "hub")], "ports": 7,
    },
}

_USB2_LEAVES = [
    ("kingston", {
        "vendor_id": "0951", "product_id": "1666", "manufacturer": "Kingston", "product": "DataTraveler 3.0",
        "vendor_db": "Kingston Technology", "model_db": "DataTraveler 100 G3/G4/SE9 G2/50",
        "speed": "480", "version": " 2.10", "device_class": "00", "interfaces": [("08", "usb-storage")],
        "serial": "E0D55EA5741AF160B97%05d",
    }),
    ("keyboard", {
        "vendor_id": "046d", "product_id": "c31c", "manufacturer": "Logitech", "product": "USB Keyboard",
        "vendor_db": "Logitech, Inc.", "model_db": "Keyboard K120", "speed": "1.5", "version": " 1.10",
        "device_class": "00", "interfaces": [("03", "usbhid"), ("03", "usbhid")],
    }),
    ("ftdi", {
        "vendor_id": "0403", "product_id": "6001", "manufacturer": "FTDI", "product": "FT232R USB UART",
        "vendor_db": "Future Technology Devices International, Ltd", "model_db": "FT232 Serial (UART) IC",
        "speed": "12", "version": " 2.00", "device_class": "00", "interfaces": [("ff", "ftdi_sio")],
        "serial": "A50%05dB",
    }),
    ("mouse", {
        "vendor_id": "413c", "product_id": "301a", "manufacturer": "PixArt", "product": "Dell MS116 USB Optical Mouse",
        "vendor_db": "Dell Computer Corp.", "speed": "1.5", "version": " 2.00",
        "device_class": "00", "interfaces": [("03", "usbhid")],
    }),
    ("cp210x", {
        # Silicon Labs' factory default serial: many boards ship with it.
        "vendor_id": "10c4", "product_id": "ea60", "manufacturer": "Silicon Labs", "product": "CP2102 USB to UART Bridge Controller",
        "vendor_db": "Silicon Labs", "model_db": "CP210x UART Bridge", "speed": "12", "version": " 1.10",
        "device_class": "00", "interfaces": [("ff", "cp210x")], "serial": "0001",
    }),
    ("ch340", {
        "vendor_id": "1a86", "product_id": "7523", "product": "USB Serial",
        "vendor_db": "QinHeng Electronics", "model_db": "CH340 serial converter", "speed": "12", "version": " 1.10",
        "device_class": "ff", "interfaces": [("ff", "ch341")],
    }),
    ("unifying", {
        "vendor_id": "046d", "product_id": "c52b", "manufacturer": "Logitech", "product": "USB Receiver",
        "vendor_db": "Logitech, Inc.", "model_db": "Unifying Receiver", "speed": "12", "version": " 2.00",
        "device_class": "00", "interfaces": [("03", "usbhid"), ("03", "usbhid"), ("03", "usbhid")],
    }),
    ("pl2303", {
        "vendor_id": "067b", "product_id": "2303", "manufacturer": "Prolific Technology Inc.", "product": "USB-Serial Controller",
        "vendor_db": "Prolific Technology, Inc.", "model_db": "PL2303 Serial Port / Mobile Action MA-8910P",
        "speed": "12", "version": " 1.10", "device_class": "00", "interfaces": [("ff", "pl2303")],
    }),
    ("flashdisk", {
        # Cheap sticks that all report the same serial.
        "vendor_id": "058f", "product_id": "6387", "manufacturer": "Generic", "product": "Flash Disk",
        "vendor_db": "Alcor Micro Corp.", "model_db": "Flash Drive", "speed": "480", "version": " 2.00",
        "device_class": "00", "interfaces": [("08", "usb-storage")], "serial": "7C9B3F11",
    }),
    ("yubikey", {
        "vendor_id": "1050", "product_id": "0407", "manufacturer": "Yubico", "product": "YubiKey OTP+FIDO+CCID",
        "vendor_db": "Yubico.com", "model_db": "Yubikey 4/5 OTP+U2F+CCID", "speed": "12", "version": " 2.00",
        "device_class": "00", "interfaces": [("03", "usbhid"), ("03", "usbhid"), ("0b", None)],
    }),
    ("arduino", {
        "vendor_id": "2341", "product_id": "0043", "manufacturer": "Arduino (www.arduino.cc)",
        "vendor_db": "Arduino SA", "model_db": "Uno R3 (CDC ACM)", "speed": "12", "version": " 1.10",
        "device_class": "02", "interfaces": [("02", "cdc_acm"), ("0a", "cdc_acm")], "serial": "8573332%08d",
    }),
    ("webcam", {
        "vendor_id": "046d", "product_id": "0825", "product": "C270 HD WEBCAM",
        "vendor_db": "Logitech, Inc.", "model_db": "Webcam C270", "speed": "480", "version": " 2.00",
        "device_class": "ef", "interfaces": [("0e", "uvcvideo"), ("0e", "uvcvideo"), ("01", "snd-usb-audio"), ("01", "snd-usb-audio")],
        "serial": "%06X0",
    }),
    ("smartcard", {
        "vendor_id": "076b", "product_id": "3021", "manufacturer": "OMNIKEY AG", "product": "Smart Card Reader USB",
        "vendor_db": "OmniKey AG", "model_db": "CardMan 3121", "speed": "12", "version": " 1.10",
        "device_class": "00", "interfaces": [("0b", None)],
    }),
    ("ups", {
        "vendor_id": "051d", "product_id": "0002", "manufacturer": "American Power Conversion", "product": "Back-UPS ES 700 FW:871.O4 .I USB FW:O4",
        "vendor_db": "American Power Conversion", "model_db": "Uninterruptible Power Supply", "speed": "1.5",
        "version": " 1.10", "device_class": "00", "interfaces": [("03", "usbhid")], "serial": "4B17%08d  ",
    }),
    ("bluetooth", {
        "vendor_id": "8087", "product_id": "0a2b", "vendor_db": "Intel Corp.", "model_db": "Bluetooth wireless interface",
        "speed": "12", "version": " 2.00", "device_class": "e0", "interfaces": [("e0", "btusb"), ("e0", "btusb")],
    }),
    ("dongle", {
        # A licence dongle with a serial that needs percent-encoding and no driver bound.
        "vendor_id": "0529", "product_id": "0001", "manufacturer": "AKS", "product": "HASP HL 3.25",
        "vendor_db": "Aladdin Knowledge Systems", "model_db": "HASP copy protection dongle", "speed": "1.5",
        "version": " 1.10", "device_class": "ff", "interfaces": [("ff", None)], "serial": "SN %04d/A:B",
    }),
    ("blank", {
        # No strings at all and nothing from the hwdb: an unknown vendor-specific gadget.
        "vendor_id": "abcd", "product_id": "1234", "speed": "12", "version": " 2.00",
        "device_class": "00", "interfaces": [("ff", None)],
    }),
]

_USB3_LEAVES = [
    ("t7", {
        "vendor_id": "04e8", "product_id": "4001", "manufacturer": "Samsung", "product": "PSSD T7",
        "vendor_db": "Samsung Electronics Co., Ltd", "model_db": "PSSD T7", "speed": "10000", "version": " 3.20",
        "device_class": "00", "interfaces": [("08", "uas")], "serial": "S5SXNG0R%06dK",
    }),
    ("kingston3", {
        "vendor_id": "0951", "product_id": "1666", "manufacturer": "Kingston", "product": "DataTraveler 3.0",
        "vendor_db": "Kingston Technology", "model_db": "DataTraveler 100 G3/G4/SE9 G2/50",
        "speed": "5000", "version": " 3.20", "device_class": "00", "interfaces": [("08", "usb-storage")],
        "serial": "60A44C41%08dF",
    }),
    ("sandisk", {
        "vendor_id": "0781", "product_id": "5583", "manufacturer": " SanDisk", "product": " Ultra Fit",
        "vendor_db": "SanDisk Corp.", "model_db": "Ultra Fit", "speed": "5000", "version": " 3.20",
        "device_class": "00", "interfaces": [("08", "usb-storage")], "serial": "4C53%016d",
    }),
    ("nic", {
        "vendor_id": "0bda", "product_id": "8153", "manufacturer": "Realtek", "product": "USB 10/100/1000 LAN",
        "vendor_db": "Realtek Semiconductor Corp.", "model_db": "RTL8153 Gigabit Ethernet Adapter", "speed": "5000",
        "version": " 3.00", "device_class": "00", "interfaces": [("ff", "r8152")], "serial": "000001",
    }),
]


def _device(port, devnum, template, number):
    device = dict((key, value) for key, value in template.items() if key != "ports")
    device["port"] = port
    device["devnum"] = devnum
    if "%" in (device.get("serial") or ""):
        device["serial"] = device["serial"] % number
    return device


def fleet_host(count=200, kinds=None):
    """``count`` USB devices (root hubs and hubs included) spread over four buses; leaves of ``kinds`` only, if given."""
    catalogues = {False: _USB2_LEAVES, True: _USB3_LEAVES}
    if kinds is not None:
        catalogues = dict((usb3, [entry for entry in catalogue if entry[0] in kinds]) for usb3, catalogue in catalogues.items())
        if not all(catalogues.values()):
            raise ValueError("kinds %s leave the USB 2 or the USB 3 buses without leaves" % (sorted(kinds),))
    buses = [(1, False, 12), (2, True, 8), (3, False, 12), (4, True, 8)]
    devices = []
    free = {}
    on_bus = {}
    for bus, usb3, ports in buses:
        devices.append(root_hub(bus, usb3=usb3))
        free[bus] = deque("%d-%d" % (bus, port) for port in range(1, ports + 1))
        on_bus[bus] = 0
    placed = 0
    hubs = dict((bus, 0) for bus, _usb3, _ports in buses)
    leaves = {False: 0, True: 0}
    while len(devices) < count:
        bus, usb3, _ports = buses[placed % len(buses)]
        placed += 1
        if not free[bus]:
            if not any(free.values()):
                raise ValueError("no free port left for %d devices" % count)
            continue
        port = free[bus].popleft()
        on_bus[bus] += 1
        tier = port.count(".") + 1
        # Every fifth device of a bus is a hub (7-port and 4-port ones alternate), and so is the
        # next one when the bus runs short of ports; hubs sit up to four tiers below the root hub.
        if tier < 5 and (on_bus[bus] % 5 == 2 or len(free[bus]) < 3):
            kind = ("usb3_7" if hubs[bus] % 2 else "usb3") if usb3 else ("usb2_7" if hubs[bus] % 2 else "usb2")
            hubs[bus] += 1
            template = _HUBS[kind]
            free[bus].extend("%s.%d" % (port, number) for number in range(1, template["ports"] + 1))
        else:
            catalogue = catalogues[usb3]
            template = catalogue[leaves[usb3] % len(catalogue)][1]
            leaves[usb3] += 1
        # devnum: the bus's next address, as the kernel hands them out (root hub is 1).
        devices.append(_device(port, on_bus[bus] + 1, template, placed))
    return devices
