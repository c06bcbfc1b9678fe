"""What enumerate_devices (plugins/module_utils/_usb.py) returned before its short cut: everything through pyudev.
tests/unit/test_enumeration_speedpath.py checks that the short cut still says the same; plugins/ must be importable."""

from __future__ import annotations


def udev_walk(context=None):
    """What enumerate_devices returned before the short cut: everything through pyudev."""
    import pyudev

    from plugins.module_utils import _usb

    context = context or pyudev.Context()
    usb_devices = []
    interfaces = {}
    for device in context.list_devices(subsystem="usb"):
        if device.device_type == "usb_device":
            usb_devices.append(device)
        elif device.device_type == "usb_interface":
            interfaces.setdefault(device.sys_name.split(":", 1)[0], []).append(device)
    devices = []
    for device in usb_devices:
        attribute = _udev_attribute_reader(device)
        vendor_id = (attribute("idVendor") or "").lower()
        product_id = (attribute("idProduct") or "").lower()
        device_class = _usb._hex_byte(attribute("bDeviceClass"))
        busnum = _usb._number(attribute("busnum"))
        devnum = _usb._number(attribute("devnum"))
        sys_name = device.sys_name
        interface_classes = []
        drivers = []
        for child in interfaces.get(_usb._interface_prefix(sys_name), []):
            code = _usb._hex_byte(_usb._text(child.attributes.get("bInterfaceClass")))
            if code is not None and code not in interface_classes:
                interface_classes.append(code)
            if child.driver and child.driver not in drivers:
                drivers.append(child.driver)
        manufacturer_string = attribute("manufacturer")
        product_string = attribute("product")
        vendor_db = _usb._text(device.properties.get("ID_VENDOR_FROM_DATABASE"))
        model_db = _usb._text(device.properties.get("ID_MODEL_FROM_DATABASE"))
        model = " ".join(name for name in (vendor_db or manufacturer_string, model_db or product_string) if name)
        is_root_hub = sys_name.startswith("usb")
        codes = [device_class] if device_class else interface_classes
        devices.append({
            "vendor_id": vendor_id,
            "product_id": product_id,
            "vendor_device_id": "%s:%s" % (vendor_id, product_id),
            "manufacturer": manufacturer_string or vendor_db,
            "product": product_string or model_db,
            "model": model or None,
            "serial": attribute("serial"),
            "bus": busnum,
            "device": devnum,
            "address": "%03d:%03d" % (busnum, devnum) if busnum is not None and devnum is not None else None,
            "port": sys_name,
            "speed": _usb._number(attribute("speed")),
            "usb_version": attribute("version"),
            "class": _usb.class_names(codes),
            "driver": ",".join(drivers) or None,
            "is_hub": device_class == _usb.HUB_CLASS,
            "is_root_hub": is_root_hub,
            "sys_path": device.sys_path,
            "parent_port": None if is_root_hub else _usb._parent_port(sys_name, busnum),
        })
    devices.sort(key=lambda device: (device["bus"] or 0, _usb._port_key(device["port"])))
    return _usb.assign_ids(devices)


def _udev_attribute_reader(device):
    from plugins.module_utils import _usb

    attributes = device.attributes

    def attribute(name):
        try:
            return _usb._text(attributes.get(name))
        except (KeyError, OSError, UnicodeDecodeError):
            return None

    return attribute
