# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""A domain's USB controller: plan the change of its persistent definition, restart, check in QEMU.

The change is made on the domain's inactive XML (read with its secrets, so that a redefine keeps
graphics passwords) and written back with one ``defineXML``:

* the USB controllers of the chosen index are replaced: the master and, for ``ich9-ehci1``, its
  three ``ich9-uhci`` companions (libvirt's "USB2 with companions" set); the new controller gets no
  PCI address, so libvirt assigns a fresh one;
* a USB device whose ``<address type='usb'>`` names a port the new controller does not have loses
  that address (and so do the devices behind a hub that lost its own), so libvirt assigns a free port.
"""

from __future__ import annotations

import copy
import json
import re
import time
import traceback
import xml.etree.ElementTree as ET

from dataclasses import dataclass, field

from ansible_collections.kvmhost.usb.plugins.module_utils import _libvirt, _lock, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import ControllerError

LIBVIRT_QEMU_IMPORT_ERROR = None
try:
    import libvirt_qemu
except ImportError:
    libvirt_qemu = None
    LIBVIRT_QEMU_IMPORT_ERROR = traceback.format_exc()

XHCI = ("qemu-xhci", "nec-xhci")
MODELS = XHCI + ("ich9-ehci1", "ehci", "piix3-uhci", "piix4-uhci", "pci-ohci", "none")
# The reference passes QEMU device names (usb-ehci, qemu-xhci); accept QEMU's names for every model.
ALIASES = {
    "usb-ehci": "ehci",
    "nec-usb-xhci": "nec-xhci",
    "ich9-usb-ehci1": "ich9-ehci1",
    "piix3-usb-uhci": "piix3-uhci",
    "piix4-usb-uhci": "piix4-uhci",
}
CHOICES = MODELS + tuple(ALIASES)

COMPANIONS = (("ich9-uhci1", 0), ("ich9-uhci2", 2), ("ich9-uhci3", 4))
XHCI_DEFAULT_PORTS = 4
XHCI_MAX_PORTS = 15
# Root ports per model as libvirt counts them (its USB address allocator).
PORTS = {"ich9-ehci1": 6, "ehci": 6, "piix3-uhci": 2, "piix4-uhci": 2, "pci-ohci": 3, "none": 0}

QEMU_TYPES = {
    "qemu-xhci": "qemu-xhci",
    "nec-xhci": "nec-usb-xhci",
    "ich9-ehci1": "ich9-usb-ehci1",
    "ehci": "usb-ehci",
    "piix3-uhci": "piix3-usb-uhci",
    "piix4-uhci": "piix4-usb-uhci",
    "pci-ohci": "pci-ohci",
    "ich9-uhci1": "ich9-usb-uhci1",
    "ich9-uhci2": "ich9-usb-uhci2",
    "ich9-uhci3": "ich9-usb-uhci3",
}
QEMU_USB_CONTROLLER_TYPE = re.compile(r"^(qemu-xhci|nec-usb-xhci|usb-ehci|ich9-usb-[eu]hci\d|piix[34]-usb-uhci|pci-ohci|vt82c686b-usb-uhci)$")

# Device speeds (Mbit/s) QEMU lets each controller carry: a plain EHCI has high-speed ports only;
# the ICH9 set hands full and low speed to its UHCI companions.
SPEEDS = {
    "qemu-xhci": (1.5, 20000),
    "nec-xhci": (1.5, 20000),
    "ich9-ehci1": (1.5, 480),
    "ehci": (480, 480),
    "piix3-uhci": (1.5, 12),
    "piix4-uhci": (1.5, 12),
    "pci-ohci": (1.5, 12),
}

LIBOSINFO_NS = "http://libosinfo.org/xmlns/libvirt/domain/1.0"
# libosinfo ids of Windows releases without an xHCI driver (Windows 8 / Server 2012 brought it).
OLD_WINDOWS = re.compile(r"^http://microsoft\.com/win/(1\.0|2\.0|3\.1|95|98|me|nt3\.51|nt4|2k|xp|2k3|2k3r2|vista|2k8|2k8r2|7)$")

POLL_SECONDS = 0.5
# The domain's own <devices> as libvirt formats it: a child of <domain>, indented by two spaces.
# (Other tools' metadata may hold a <devices> element too, deeper.)


@dataclass
class Request:
    model: str
    index: int = 0
    ports: int | None = None
    restart: bool = False
    shutdown_timeout: int = 120


@dataclass
class Plan:
    text: str
    root: ET.Element
    before: list
    after: list
    readdressed: list = field(default_factory=list)
    moved_before: list = field(default_factory=list)
    moved_after: list = field(default_factory=list)

    @property
    def changed(self):
        return signature(self.before) != signature(self.after) or bool(self.readdressed)

    def xml(self):
        """The new domain XML: the old text with only its <devices> element replaced.

        Everything else stays as libvirt wrote it; ElementTree would move the metadata's namespace
        declarations and rename default namespaces of other tools' metadata."""
        return _libvirt.with_devices(self.text, self.root.find("devices"))

    def diff(self):
        return {"before": render(self.before + self.moved_before), "after": render(self.after + self.moved_after)}


def canonical_model(name):
    model = ALIASES.get(name, name)
    if model not in MODELS:
        raise ControllerError(
            "Unknown USB controller model %r. Accepted: %s; aliases: %s"
            % (name, ", ".join(MODELS), ", ".join("%s (%s)" % (alias, model) for alias, model in ALIASES.items()))
        )
    return model


def validate(request):
    if request.index < 0:
        raise ControllerError("index must be 0 or more, got %d" % request.index)
    if request.shutdown_timeout < 0:
        raise ControllerError("shutdown_timeout must be 0 or more seconds, got %d" % request.shutdown_timeout)
    if request.ports is not None:
        if request.model not in XHCI:
            raise ControllerError("ports applies to xHCI controllers only (%s), not to %s" % (", ".join(XHCI), request.model))
        if not 1 <= request.ports <= XHCI_MAX_PORTS:
            raise ControllerError("ports must be between 1 and %d for %s, got %d" % (XHCI_MAX_PORTS, request.model, request.ports))


def usb_controllers(root, index):
    return [element for element in root.findall("./devices/controller[@type='usb']") if _int(element.get("index"), 0) == index]


def master_of(controllers):
    for element in controllers:
        if element.find("master") is None:
            return element
    return None


def describe(controllers):
    """Model and ports of a controller set, as the module returns it."""
    master = master_of(controllers)
    if master is None:
        return {"model": None, "ports": None}
    return {"model": master.get("model", "default"), "ports": _int(master.get("ports"), None)}


def signature(controllers):
    master = master_of(controllers)
    if master is None:
        return None
    companions = sorted(element.get("model", "") for element in controllers if element is not master)
    return (master.get("model"), master.get("ports"), tuple(companions))


def port_count(model, ports):
    if model in XHCI:
        return ports or XHCI_DEFAULT_PORTS
    return PORTS[model]


def plan(xml_text, request):
    """The domain XML with the requested controller, and what changes."""
    root = ET.fromstring(xml_text)
    devices = root.find("devices")
    if devices is None or _libvirt.devices_element(xml_text) is None:
        raise ControllerError("Cannot find the <devices> element in the domain XML as libvirt formats it")
    old = usb_controllers(root, request.index)
    if request.model == "none":
        _check_none(root, request.index)
    wanted = _wanted_controllers(old, request)
    _replace(devices, old, wanted)
    plan_ = Plan(text=xml_text, root=root, before=old, after=wanted)
    _drop_invalid_addresses(plan_, devices, request.index, port_count(request.model, _int(master_of(wanted).get("ports"), None)))
    return plan_


def _check_none(root, index):
    if index != 0:
        raise ControllerError("Model none disables the domain's USB bus; give it for index 0")
    others = sorted({element.get("index", "0") for element in root.findall("./devices/controller[@type='usb']")} - {"0"})
    if others:
        raise ControllerError("Model none disables the domain's USB bus, but it has USB controllers with index %s too" % ", ".join(others))
    users = [describe_device(element) for element in root.find("devices") if _on_usb(element)]
    if users:
        raise ControllerError("Model none disables the domain's USB bus, but these devices use it: %s. Remove them first." % "; ".join(users))


def _on_usb(element):
    if element.find("address[@type='usb']") is not None or element.tag == "hub":
        return True
    if element.tag == "hostdev":
        return element.get("type") == "usb"
    return element.tag in ("input", "redirdev", "disk") and element.get("bus") == "usb"


def _wanted_controllers(old, request):
    """The controller elements of the index as requested: the old ones where they already are."""
    master = master_of(old)
    old_model = master.get("model") if master is not None else None
    if old_model == request.model and (request.model != "ich9-ehci1" or _has_companions(old)):
        wanted = [copy.deepcopy(element) for element in old]
        wanted_master = master_of(wanted)
    else:
        # A fresh set without PCI addresses: libvirt places it, an ICH9 set in one multifunction slot.
        wanted_master = ET.Element("controller", type="usb", index=str(request.index), model=request.model)
        alias = master.find("alias") if master is not None else None
        # A user alias (ua-*) may be referenced elsewhere; libvirt's own aliases are not in the inactive XML.
        if alias is not None and alias.get("name", "").startswith("ua-"):
            wanted_master.append(copy.deepcopy(alias))
        wanted = [wanted_master]
        if request.model == "ich9-ehci1":
            for model, startport in COMPANIONS:
                companion = ET.Element("controller", type="usb", index=str(request.index), model=model)
                ET.SubElement(companion, "master", startport=str(startport))
                wanted.append(companion)
    ports = request.ports
    if ports is None and old_model in XHCI and request.model in XHCI:
        ports = _int(master.get("ports"), None)
    if ports is None:
        wanted_master.attrib.pop("ports", None)
    else:
        wanted_master.set("ports", str(ports))
    return wanted


def _has_companions(controllers):
    models = sorted(element.get("model") for element in controllers if element.find("master") is not None)
    return models == sorted(model for model, _startport in COMPANIONS)


def _replace(devices, old, wanted):
    children = list(devices)
    if old:
        position = children.index(old[0])
    else:
        controllers = [i for i, element in enumerate(children) if element.tag == "controller"]
        position = controllers[-1] + 1 if controllers else len(children)
    neighbour = children[position - 1] if position else None
    tail = neighbour.tail if neighbour is not None else devices.text
    for element in old:
        devices.remove(element)
    for offset, element in enumerate(wanted):
        element.tail = tail
        devices.insert(position + offset, element)
    if old and not wanted[-1] in old:
        wanted[-1].tail = old[-1].tail


def _drop_invalid_addresses(plan_, devices, index, ports):
    """Remove the USB addresses on ``index`` whose root port the controller lacks.

    Devices behind a hub share its root port (port 5.2 is behind the hub at port 5), so a hub
    and the devices behind it lose their addresses together."""
    for element in devices:
        address = element.find("address[@type='usb']")
        if address is None or _int(address.get("bus"), 0) != index or not address.get("port"):
            continue
        port = address.get("port")
        if _int(port.split(".")[0], 0) <= ports:
            continue
        plan_.moved_before.append(copy.deepcopy(element))
        element.remove(address)
        plan_.moved_after.append(element)
        plan_.readdressed.append({"device": describe_device(element), "bus": index, "port": port})


def describe_device(element):
    """A device element in a few words: its tag and attributes, for a USB hostdev what it designates."""
    text = " ".join([element.tag] + ["%s=%s" % item for item in sorted(element.attrib.items())])
    for hostdev in _hostdevs(element):
        if hostdev["vendor_id"]:
            text += " %s:%s" % (hostdev["vendor_id"], hostdev["product_id"])
        if hostdev["bus"] is not None:
            text += " host bus %s device %s" % (hostdev["bus"], hostdev["device"])
    return text


def _hostdevs(element):
    hostdev = _libvirt.usb_hostdev(element)
    return [hostdev] if hostdev is not None else []


def render(elements):
    """Elements as indented XML text, one after the other, for diffs."""
    lines = []
    for element in elements:
        element = copy.deepcopy(element)
        for node in element.iter():
            # The whitespace libvirt formatted the XML with; ET.indent lays it out anew.
            node.tail = None
            if node.text is not None and not node.text.strip():
                node.text = None
        ET.indent(element, space="  ")
        lines.append(ET.tostring(element, encoding="unicode"))
    return "\n".join(lines) + "\n" if lines else ""


# Warnings


def os_warnings(root, model):
    if model not in XHCI:
        return []
    os_element = root.find("./metadata/{%s}libosinfo/{%s}os" % (LIBOSINFO_NS, LIBOSINFO_NS))
    os_id = os_element.get("id", "") if os_element is not None else ""
    if not OLD_WINDOWS.match(os_id):
        return []
    return [
        "The domain's libosinfo metadata names %s, which has no xHCI (USB 3) driver: its USB devices will not work "
        "on %s. Use ehci or ich9-ehci1 (USB 2) for it." % (os_id, model)
    ]


def speed_warnings(root, model, index, host_devices):
    """Warnings for the domain's USB hostdevs whose host speed the new controller cannot carry as it is."""
    if model not in SPEEDS:
        return []
    slowest, fastest = SPEEDS[model]
    warnings = []
    for element in root.findall("./devices/hostdev[@type='usb']"):
        address = element.find("address[@type='usb']")
        if address is not None and _int(address.get("bus"), 0) != index:
            continue
        for device in host_devices:
            speed = device.get("speed")
            if speed is None or not any(_libvirt.hostdev_matches(hostdev, device) for hostdev in _hostdevs(element)):
                continue
            name = "%s (%s)" % (device["id"], device["model"] or "unnamed")
            if speed > fastest:
                warnings.append(
                    "USB device %s is attached to the host at %s Mbit/s (%s), faster than %s carries (%s Mbit/s): "
                    "QEMU offers it at the lower speed only when its endpoints allow that and otherwise refuses it "
                    "('speed mismatch'), as for UAS disks (bulk streams) and webcams or audio devices (isochronous)."
                    % (name, _mbits(speed), _speed_name(speed), model, _mbits(fastest))
                )
            elif speed < slowest:
                warnings.append(
                    "USB device %s is attached to the host at %s Mbit/s (%s): QEMU's plain EHCI (ehci, the reference's "
                    "usb-ehci) has high-speed ports only and refuses it ('speed mismatch'). ich9-ehci1 comes with UHCI "
                    "companions that carry it." % (name, _mbits(speed), _speed_name(speed))
                )
    return warnings


def host_usb_devices():
    """The host's USB devices for the speed warnings; none without pyudev (no warnings then)."""
    if _usb.pyudev is None:
        return []
    return _usb.passthrough_candidates(_usb.enumerate_devices())


def _speed_name(speed):
    if speed >= 5000:
        return "SuperSpeed"
    if speed >= 480:
        return "high speed"
    if speed >= 12:
        return "full speed"
    return "low speed"


def _mbits(speed):
    return ("%g" % speed) if speed else "?"


# Restart and the check in QEMU


def restart(domain, timeout, sleep=time.sleep, clock=time.monotonic):
    """Shut the domain down (forced off after ``timeout`` seconds) and start it; True when it was forced."""
    forced = False
    _unless_off(domain.shutdown)
    deadline = clock() + timeout
    while domain.isActive():
        if clock() >= deadline:
            forced = True
            _unless_off(domain.destroy)
            break
        sleep(POLL_SECONDS)
    domain.create()
    return forced


def _unless_off(stop):
    """Shut down or destroy a domain; libvirt's refusal because it is off already (it may have shut off since it was
    looked at) is no error."""
    try:
        stop()
    except _libvirt.libvirt.libvirtError as error:
        if error.get_error_code() != _libvirt.libvirt.VIR_ERR_OPERATION_INVALID:
            raise


def qemu_devices(domain):
    """QOM type by device id of the running QEMU, and the types of its devices without id."""
    named = dict((item["name"], _child_type(item["type"])) for item in _qom_list(domain, "/machine/peripheral"))
    anonymous = [_child_type(item["type"]) for item in _qom_list(domain, "/machine/peripheral-anon")]
    return named, anonymous


def _qom_list(domain, path):
    command = json.dumps({"execute": "qom-list", "arguments": {"path": path}})
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(domain, command, 0))
    return [item for item in reply.get("return", []) if item.get("type", "").startswith("child<")]


def _child_type(text):
    return text.removeprefix("child<").removesuffix(">")


def verify_in_qemu(domain, request):
    """Fail unless the running QEMU of the domain has the requested controller set."""
    named, anonymous = qemu_devices(domain)
    live = usb_controllers(ET.fromstring(_libvirt.domain_xml(domain)), request.index)
    present = sorted(set(type_ for type_ in list(named.values()) + anonymous if QEMU_USB_CONTROLLER_TYPE.match(type_)))
    if request.model == "none":
        if present:
            raise ControllerError("Domain restarted, but its QEMU still has USB controllers: %s" % ", ".join(present), changed=True)
        return
    master = master_of(live)
    alias = master.find("alias") if master is not None else None
    device_id = alias.get("name") if alias is not None else ("usb" if request.index == 0 else "usb%d" % request.index)
    expected = QEMU_TYPES[request.model]
    if named.get(device_id) != expected:
        raise ControllerError(
            "Domain restarted, but its QEMU has %s as USB controller %s, not %s (USB controllers in QEMU: %s)"
            % (named.get(device_id) or "nothing", device_id, expected, ", ".join(present) or "none"),
            changed=True,
        )
    if request.model == "ich9-ehci1":
        missing = [QEMU_TYPES[model] for model, _startport in COMPANIONS if QEMU_TYPES[model] not in anonymous + list(named.values())]
        if missing:
            raise ControllerError("Domain restarted, but its QEMU lacks the EHCI companions %s" % ", ".join(missing), changed=True)


# The whole run


def run(conn, domain_name, request, check_mode):
    """Change the controller of a domain as requested; the module's result, warnings included."""
    validate(request)
    domain = _libvirt.find_domain(conn, domain_name)
    if not domain.isPersistent():
        raise ControllerError("Domain %s is transient: it has no persistent definition whose USB controller could be changed" % domain_name)
    # One writer at a time per host: usb_attach changes the same definitions.
    with _lock.maybe_lock(check_mode):
        plan_ = plan(_libvirt.persistent_xml(domain), request)
        after = describe(plan_.after)
        if plan_.changed and not check_mode:
            _define(conn, plan_)
            after = describe(usb_controllers(ET.fromstring(_libvirt.domain_xml(domain, inactive=True)), request.index))
        restart_required = bool(domain.isActive()) and _live_signature(domain, request.index) != signature(plan_.after)
        restarted = forced = False
        warnings = os_warnings(plan_.root, request.model) + speed_warnings(plan_.root, request.model, request.index, host_usb_devices())
        if restart_required and request.restart:
            restarted = True
            restart_required = False
            if not check_mode:
                forced = _restart(domain, domain_name, request)
                if libvirt_qemu is None:
                    warnings.append("Not checked in QEMU that the controller is there: the libvirt_qemu module is missing")
                else:
                    verify_in_qemu(domain, request)
    if forced:
        warnings.append("Domain %s did not shut down within %d s; it was forced off" % (domain_name, request.shutdown_timeout))
    return {
        "changed": plan_.changed or restarted,
        "controller": {"index": request.index, "before": describe(plan_.before), "after": after},
        "restart_required": restart_required,
        "restarted": restarted,
        "readdressed": plan_.readdressed,
        "diff": plan_.diff(),
        "warnings": warnings,
    }


def _live_signature(domain, index):
    return signature(usb_controllers(ET.fromstring(_libvirt.domain_xml(domain)), index))


def _restart(domain, domain_name, request):
    try:
        return restart(domain, request.shutdown_timeout)
    except _libvirt.libvirt.libvirtError as error:
        raise ControllerError(
            "The persistent definition of %s has the %s controller, but restarting the domain failed: %s"
            % (domain_name, request.model, _libvirt.error_message(error)),
            changed=True,
        )


def _define(conn, plan_):
    try:
        conn.defineXMLFlags(plan_.xml(), _libvirt.libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except _libvirt.libvirt.libvirtError as error:
        raise ControllerError(
            "libvirt refused the definition with the %s controller: %s" % (master_of(plan_.after).get("model"), _libvirt.error_message(error))
        )


def _int(value, default):
    if value is None or value == "":
        return default
    try:
        return int(value, 16) if value.lower().startswith("0x") else int(value)
    except ValueError:
        return default
