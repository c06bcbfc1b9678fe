"""qemu_usb_controller against the test run's own libvirtd, with diskless TCG domains named kvmhost-usb-test-ctl-*."""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET

import libvirt
import pytest

from tests.lib.domains import URI, undefine
from tests.lib.modrun import collection_root, run_module
from tests.lib.trees import REFERENCE, hid

# The pure parts (planning, restart, the QEMU check with stand-ins) are tested in this process.
sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils import _controller  # noqa: E402

PREFIX = "kvmhost-usb-test-ctl-"
SECURE_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  {metadata}
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
  <devices>
    {controller}
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>"""

WIN2K8R2 = (
    "<metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>"
    "<libosinfo:os id='http://microsoft.com/win/2k8r2'/></libosinfo:libosinfo></metadata>"
)
KINGSTON_HOSTDEV = "<hostdev mode='subsystem' type='usb'><source><vendor id='0x0951'/><product id='0x1666'/></source>{address}</hostdev>"
TABLET = "<input type='tablet' bus='usb'>{address}</input>"
# A full-speed device (a keyboard, say) of the host, next to the reference's tablet and stick.
KEYBOARD = hid("1-2", 3, serial="kbd", vendor_id="046d", product_id="c31c", speed="12", version=" 1.10")


def usb_address(port, bus=0):
    return "<address type='usb' bus='%d' port='%s'/>" % (bus, port)


class Domains:
    def __init__(self):
        self.conn = libvirt.open(URI)
        self.names = []

    def define(self, suffix, controller="<controller type='usb' index='0' model='qemu-xhci'/>", devices=(), machine="pc", metadata=""):
        name = PREFIX + suffix
        self.remove(name)
        self.names.append(name)
        xml = DOMAIN_XML.format(name=name, controller=controller, devices="\n    ".join(devices), machine=machine, metadata=metadata)
        self.conn.defineXML(xml)
        return name

    def xml(self, name):
        return self.conn.lookupByName(name).XMLDesc(SECURE_INACTIVE)

    def controllers(self, name):
        """The USB controllers of the persistent definition, each as libvirt formats it."""
        return re.findall(r"^    <controller type='usb'[^\n]*/>$|^    <controller type='usb'.*?^    </controller>$", self.xml(name), re.S | re.M)

    def usb_addresses(self, name):
        root = ET.fromstring(self.xml(name))
        return dict(
            (_short(element), (element.find("address").get("bus"), element.find("address").get("port")))
            for element in root.find("devices")
            if element.find("address[@type='usb']") is not None
        )

    def remove(self, name):
        undefine(self.conn, name)

    def close(self):
        for name in self.names:
            self.remove(name)
        self.conn.close()


def _short(element):
    if element.tag == "hostdev":
        return "hostdev"
    return "%s:%s" % (element.tag, element.get("type"))


@pytest.fixture
def domains():
    created = Domains()
    try:
        yield created
    finally:
        created.close()


@pytest.fixture(scope="module")
def can_start():
    """The run's libvirtd starts a diskless TCG domain (tests/unit/conftest.py starts it so that it can)."""
    created = Domains()
    try:
        name = created.define("start-probe")
        created.conn.lookupByName(name).create()
    finally:
        created.close()


def controller(args, devices=None, check_mode=False, diff=False):
    return run_module("qemu_usb_controller", dict({"uri": URI}, **args), devices=devices, check_mode=check_mode, diff=diff)


def ok(result):
    assert result["rc"] == 0, result
    assert not result.get("failed"), result
    return result


def failed(result, text):
    assert result.get("failed"), result
    assert text in result["msg"], result["msg"]
    return result["msg"]


# The persistent change


def test_usb_ehci_replaces_qemu_xhci_and_nothing_else(domains):
    name = domains.define("ehci", devices=[TABLET.format(address="")])
    before = domains.xml(name)
    result = ok(controller({"domain": name, "model": "usb-ehci"}))
    assert result["changed"] is True
    assert result["controller"] == {"index": 0, "before": {"model": "qemu-xhci", "ports": None}, "after": {"model": "ehci", "ports": None}}
    assert result["restart_required"] is False
    assert result["restarted"] is False
    assert result["readdressed"] == []
    assert result["warnings"] == []
    # libvirt gives the new controller the PCI slot the old one freed: the rest is byte for byte the same.
    assert domains.xml(name) == before.replace("<controller type='usb' index='0' model='qemu-xhci'>", "<controller type='usb' index='0' model='ehci'>")
    assert domains.controllers(name) == [
        "    <controller type='usb' index='0' model='ehci'>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>\n"
        "    </controller>"
    ]


def test_q35_ehci_gets_a_fresh_pci_address_behind_a_pci_bridge(domains):
    name = domains.define("q35", machine="q35")
    before = domains.xml(name)
    assert "pcie-to-pci-bridge" not in before
    ok(controller({"domain": name, "model": "ehci"}))
    after = domains.xml(name)
    [element] = domains.controllers(name)
    bridge = re.search(r"<controller type='pci' index='(\d+)' model='pcie-to-pci-bridge'>", after)
    assert bridge, after
    # ehci is a conventional PCI device: on q35 libvirt puts it behind the bridge it adds.
    assert element == (
        "    <controller type='usb' index='0' model='ehci'>\n"
        "      <address type='pci' domain='0x0000' bus='0x%02x' slot='0x01' function='0x0'/>\n"
        "    </controller>" % int(bridge.group(1))
    )


def test_ich9_ehci1_comes_with_its_uhci_companions_in_one_slot(domains):
    name = domains.define("ich9", devices=[TABLET.format(address="")])
    result = ok(controller({"domain": name, "model": "ich9-ehci1"}))
    assert result["controller"]["after"] == {"model": "ich9-ehci1", "ports": None}
    assert domains.controllers(name) == [
        "    <controller type='usb' index='0' model='ich9-ehci1'>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x7'/>\n"
        "    </controller>",
        "    <controller type='usb' index='0' model='ich9-uhci1'>\n"
        "      <master startport='0'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/>\n"
        "    </controller>",
        "    <controller type='usb' index='0' model='ich9-uhci2'>\n"
        "      <master startport='2'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x1'/>\n"
        "    </controller>",
        "    <controller type='usb' index='0' model='ich9-uhci3'>\n"
        "      <master startport='4'/>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x2'/>\n"
        "    </controller>",
    ]
    assert ok(controller({"domain": name, "model": "ich9-ehci1"}))["changed"] is False


def test_a_lone_ich9_ehci1_gets_its_companions(domains):
    name = domains.define("lone-ich9", controller="<controller type='usb' index='0' model='ich9-ehci1'/>")
    result = ok(controller({"domain": name, "model": "ich9-ehci1"}))
    assert result["changed"] is True
    assert [re.search(r"model='([^']+)'", element).group(1) for element in domains.controllers(name)] == [
        "ich9-ehci1",
        "ich9-uhci1",
        "ich9-uhci2",
        "ich9-uhci3",
    ]


def test_leaving_the_ich9_set_removes_the_companions(domains):
    name = domains.define("from-ich9")
    ok(controller({"domain": name, "model": "ich9-ehci1"}))
    result = ok(controller({"domain": name, "model": "qemu-xhci"}))
    assert result["controller"]["before"] == {"model": "ich9-ehci1", "ports": None}
    assert domains.controllers(name) == [
        "    <controller type='usb' index='0' model='qemu-xhci'>\n"
        "      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>\n"
        "    </controller>"
    ]


@pytest.mark.parametrize(
    "alias, model",
    [("usb-ehci", "ehci"), ("nec-usb-xhci", "nec-xhci"), ("ich9-usb-ehci1", "ich9-ehci1"), ("piix3-usb-uhci", "piix3-uhci"), ("piix4-usb-uhci", "piix4-uhci")],
)
def test_qemu_device_names_are_aliases(domains, alias, model):
    name = domains.define("alias")
    result = ok(controller({"domain": name, "model": alias}))
    assert result["controller"]["after"]["model"] == model
    assert domains.controllers(name)[0].startswith("    <controller type='usb' index='0' model='%s'>" % model)
    assert ok(controller({"domain": name, "model": model}))["changed"] is False


@pytest.mark.parametrize("model", ["qemu-xhci", "nec-xhci", "ehci", "ich9-ehci1", "piix3-uhci", "piix4-uhci", "pci-ohci"])
def test_every_model_is_idempotent(domains, model):
    name = domains.define("idem", controller="<controller type='usb' index='0' model='piix3-uhci'/>" if model != "piix3-uhci" else "")
    first = ok(controller({"domain": name, "model": model}))
    assert first["changed"] is (model != "piix3-uhci")
    xml = domains.xml(name)
    second = ok(controller({"domain": name, "model": model}))
    assert second["changed"] is False
    assert second["controller"]["before"] == second["controller"]["after"] == first["controller"]["after"]
    assert domains.xml(name) == xml


def test_model_none_disables_usb_of_a_domain_without_usb_devices(domains):
    name = domains.define("none")
    result = ok(controller({"domain": name, "model": "none"}))
    assert result["controller"]["after"] == {"model": "none", "ports": None}
    assert domains.controllers(name) == ["    <controller type='usb' index='0' model='none'/>"]
    assert ok(controller({"domain": name, "model": "none"}))["changed"] is False


def test_model_none_is_refused_while_usb_devices_use_the_bus(domains):
    name = domains.define("none-busy", devices=[TABLET.format(address=""), KINGSTON_HOSTDEV.format(address="")])
    xml = domains.xml(name)
    message = failed(controller({"domain": name, "model": "none"}), "Model none disables the domain's USB bus, but these devices use it")
    assert "input bus=usb type=tablet" in message
    assert "hostdev managed=no mode=subsystem type=usb 0951:1666" in message
    assert domains.xml(name) == xml


def test_a_second_controller_index_is_added(domains):
    name = domains.define("index1")
    result = ok(controller({"domain": name, "model": "ehci", "index": 1}))
    assert result["controller"] == {"index": 1, "before": {"model": None, "ports": None}, "after": {"model": "ehci", "ports": None}}
    models = [re.search(r"index='(\d)' model='([^']+)'", element).groups() for element in domains.controllers(name)]
    assert models == [("0", "qemu-xhci"), ("1", "ehci")]


# Errors


def test_unknown_model_lists_the_accepted_ones_and_changes_nothing(domains):
    name = domains.define("bad-model")
    xml = domains.xml(name)
    message = failed(controller({"domain": name, "model": "usb-xhci3000"}), "value of model must be one of:")
    for model in _controller.MODELS + tuple(_controller.ALIASES):
        assert model in message
    assert "got: usb-xhci3000" in message
    assert domains.xml(name) == xml


def test_companion_models_alone_are_not_accepted(domains):
    name = domains.define("companion")
    failed(controller({"domain": name, "model": "ich9-uhci1"}), "value of model must be one of:")


def test_canonical_model_error_lists_models_and_aliases():
    with pytest.raises(_controller.ControllerError) as error:
        _controller.canonical_model("usb-xhci3000")
    assert str(error.value) == (
        "Unknown USB controller model 'usb-xhci3000'. Accepted: qemu-xhci, nec-xhci, ich9-ehci1, ehci, piix3-uhci, piix4-uhci, pci-ohci, none; "
        "aliases: usb-ehci (ehci), nec-usb-xhci (nec-xhci), ich9-usb-ehci1 (ich9-ehci1), piix3-usb-uhci (piix3-uhci), piix4-usb-uhci (piix4-uhci)"
    )


def test_unknown_domain_names_the_domains_of_the_host(domains):
    present = domains.define("present")
    message = failed(controller({"domain": PREFIX + "absent", "model": "ehci"}), "No domain named or with UUID %sabsent; domains on this host: " % PREFIX)
    assert present in message


def test_domain_by_uuid(domains):
    name = domains.define("by-uuid")
    uuid = domains.conn.lookupByName(name).UUIDString()
    assert ok(controller({"domain": uuid, "model": "ehci"}))["changed"] is True
    assert domains.controllers(name)[0].startswith("    <controller type='usb' index='0' model='ehci'>")


def test_unreachable_libvirt_fails_clearly(domains):
    failed(controller({"domain": "any", "model": "ehci", "uri": "qemu+unix:///system?socket=/nonexistent/sock"}), "Cannot connect to libvirt at qemu+unix")


# Check mode and diff


def test_check_mode_predicts_and_changes_nothing(domains):
    name = domains.define("check", controller="<controller type='usb' index='0' model='qemu-xhci' ports='8'/>", devices=[TABLET.format(address=usb_address(7))])
    xml = domains.xml(name)
    result = ok(controller({"domain": name, "model": "ehci"}, check_mode=True))
    assert result["changed"] is True
    assert result["controller"] == {"index": 0, "before": {"model": "qemu-xhci", "ports": 8}, "after": {"model": "ehci", "ports": None}}
    assert result["readdressed"] == [{"device": "input bus=usb type=tablet", "bus": 0, "port": "7"}]
    assert domains.xml(name) == xml


def test_diff_shows_the_controller_and_the_readdressed_devices(domains):
    name = domains.define("diff", controller="<controller type='usb' index='0' model='qemu-xhci' ports='8'/>", devices=[TABLET.format(address=usb_address(7))])
    result = ok(controller({"domain": name, "model": "ehci"}, diff=True))
    assert result["diff"] == {
        "before": (
            '<controller type="usb" index="0" model="qemu-xhci" ports="8">\n'
            '  <address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x0" />\n'
            "</controller>\n"
            '<input type="tablet" bus="usb">\n'
            '  <address type="usb" bus="0" port="7" />\n'
            "</input>\n"
        ),
        "after": '<controller type="usb" index="0" model="ehci" />\n<input type="tablet" bus="usb" />\n',
    }
    assert "diff" not in ok(controller({"domain": name, "model": "ehci"}))


def test_check_mode_diff_equals_the_real_diff(domains):
    name = domains.define("diff-check")
    predicted = ok(controller({"domain": name, "model": "ich9-ehci1"}, check_mode=True, diff=True))
    real = ok(controller({"domain": name, "model": "ich9-ehci1"}, diff=True))
    assert predicted["diff"] == real["diff"]
    assert predicted["controller"] == real["controller"]


# USB devices keep valid addresses


def test_usb_devices_keep_valid_addresses(domains):
    name = domains.define(
        "addresses",
        controller="<controller type='usb' index='0' model='qemu-xhci' ports='8'/>",
        devices=[
            TABLET.format(address=usb_address(7)),
            KINGSTON_HOSTDEV.format(address=usb_address(2)),
            "<hub type='usb'>%s</hub>" % usb_address(8),
            "<input type='mouse' bus='usb'>%s</input>" % usb_address("8.1"),
        ],
    )
    result = ok(controller({"domain": name, "model": "usb-ehci"}))
    assert sorted(result["readdressed"], key=lambda item: item["port"]) == [
        {"device": "input bus=usb type=tablet", "bus": 0, "port": "7"},
        {"device": "hub type=usb", "bus": 0, "port": "8"},
        {"device": "input bus=usb type=mouse", "bus": 0, "port": "8.1"},
    ]
    addresses = domains.usb_addresses(name)
    # The hostdev keeps its port; libvirt gave the others free ports of the EHCI controller (6 ports).
    assert addresses["hostdev"] == ("0", "2")
    assert sorted(addresses) == ["hostdev", "hub:usb", "input:mouse", "input:tablet"]
    assert len(set(addresses.values())) == 4
    for bus, port in addresses.values():
        assert bus == "0"
        assert 1 <= int(port.split(".")[0]) <= 6


def test_shrinking_xhci_ports_readdresses_only_what_no_longer_fits(domains):
    name = domains.define(
        "shrink",
        controller="<controller type='usb' index='0' model='qemu-xhci' ports='8'/>",
        devices=[TABLET.format(address=usb_address(3)), KINGSTON_HOSTDEV.format(address=usb_address(6))],
    )
    result = ok(controller({"domain": name, "model": "qemu-xhci", "ports": 4}))
    assert result["controller"] == {"index": 0, "before": {"model": "qemu-xhci", "ports": 8}, "after": {"model": "qemu-xhci", "ports": 4}}
    assert result["readdressed"] == [{"device": "hostdev managed=no mode=subsystem type=usb 0951:1666", "bus": 0, "port": "6"}]
    addresses = domains.usb_addresses(name)
    assert addresses["input:tablet"] == ("0", "3")
    assert int(addresses["hostdev"][1]) <= 4


def test_devices_on_another_controller_are_left_alone(domains):
    name = domains.define(
        "other-bus",
        controller="<controller type='usb' index='0' model='qemu-xhci' ports='8'/><controller type='usb' index='1' model='qemu-xhci' ports='8'/>",
        devices=[TABLET.format(address=usb_address(7, bus=1))],
    )
    result = ok(controller({"domain": name, "model": "ehci"}))
    assert result["readdressed"] == []
    assert domains.usb_addresses(name)["input:tablet"] == ("1", "7")


# ports


def test_ports_of_an_xhci_controller(domains):
    name = domains.define("ports")
    result = ok(controller({"domain": name, "model": "qemu-xhci", "ports": 15}))
    assert result["controller"]["after"] == {"model": "qemu-xhci", "ports": 15}
    assert domains.controllers(name)[0].startswith("    <controller type='usb' index='0' model='qemu-xhci' ports='15'>")
    # Not given: an xHCI controller keeps its ports, also when it becomes the other xHCI model.
    assert ok(controller({"domain": name, "model": "qemu-xhci"}))["changed"] is False
    assert ok(controller({"domain": name, "model": "nec-xhci"}))["controller"]["after"] == {"model": "nec-xhci", "ports": 15}


@pytest.mark.parametrize(
    "args, message",
    [
        ({"model": "ehci", "ports": 4}, "ports applies to xHCI controllers only (qemu-xhci, nec-xhci), not to ehci"),
        ({"model": "usb-ehci", "ports": 4}, "ports applies to xHCI controllers only (qemu-xhci, nec-xhci), not to ehci"),
        ({"model": "qemu-xhci", "ports": 16}, "ports must be between 1 and 15 for qemu-xhci, got 16"),
        ({"model": "nec-xhci", "ports": 0}, "ports must be between 1 and 15 for nec-xhci, got 0"),
        ({"model": "ehci", "index": -1}, "index must be 0 or more, got -1"),
        ({"model": "none", "index": 1}, "Model none disables the domain's USB bus; give it for index 0"),
    ],
)
def test_invalid_options_change_nothing(domains, args, message):
    name = domains.define("invalid")
    xml = domains.xml(name)
    failed(controller(dict(args, domain=name)), message)
    assert domains.xml(name) == xml


# Warnings


def test_windows_2008_r2_with_xhci_is_warned_about(domains):
    name = domains.define("win2k8r2", controller="<controller type='usb' index='0' model='ehci'/>", metadata=WIN2K8R2)
    result = ok(controller({"domain": name, "model": "qemu-xhci"}))
    assert result["warnings"] == [
        "The domain's libosinfo metadata names http://microsoft.com/win/2k8r2, which has no xHCI (USB 3) driver: "
        "its USB devices will not work on qemu-xhci. Use ehci or ich9-ehci1 (USB 2) for it."
    ]
    assert ok(controller({"domain": name, "model": "usb-ehci"}))["warnings"] == []


def test_the_metadata_survives_the_redefinition(domains):
    name = domains.define(
        "keeps",
        controller="<controller type='usb' index='0' model='ehci'/><graphics type='vnc' port='-1' autoport='yes' passwd='s3cret'/>",
        metadata=WIN2K8R2,
    )
    before = domains.xml(name)
    ok(controller({"domain": name, "model": "nec-xhci"}))
    after = domains.xml(name)
    assert after == before.replace("model='ehci'", "model='nec-xhci'")
    assert "passwd='s3cret'" in after


def test_superspeed_device_on_ehci_is_warned_about(domains):
    name = domains.define("superspeed", devices=[KINGSTON_HOSTDEV.format(address="")])
    result = ok(controller({"domain": name, "model": "ehci"}, devices=REFERENCE))
    assert result["warnings"] == [
        "USB device 0951:1666:E0D55EA5741AF160B9740A81 (Kingston Technology DataTraveler 100 G3/G4/SE9 G2/50) is attached "
        "to the host at 5000 Mbit/s (SuperSpeed), faster than ehci carries (480 Mbit/s): QEMU offers it at the lower speed "
        "only when its endpoints allow that and otherwise refuses it ('speed mismatch'), as for UAS disks (bulk streams) "
        "and webcams or audio devices (isochronous)."
    ]
    assert ok(controller({"domain": name, "model": "qemu-xhci"}, devices=REFERENCE))["warnings"] == []


def test_superspeed_device_on_uhci_is_warned_about(domains):
    name = domains.define("superspeed-uhci", devices=[KINGSTON_HOSTDEV.format(address="")])
    [warning] = ok(controller({"domain": name, "model": "piix3-uhci"}, devices=REFERENCE))["warnings"]
    assert "at 5000 Mbit/s (SuperSpeed), faster than piix3-uhci carries (12 Mbit/s)" in warning


def test_full_speed_device_on_plain_ehci_is_warned_about(domains):
    keyboard = "<hostdev mode='subsystem' type='usb'><source><vendor id='0x046d'/><product id='0xc31c'/></source></hostdev>"
    name = domains.define("fullspeed", devices=[keyboard])
    [warning] = ok(controller({"domain": name, "model": "usb-ehci"}, devices=REFERENCE + [KEYBOARD]))["warnings"]
    assert warning.startswith("USB device 046d:c31c:kbd (")
    assert "is attached to the host at 12 Mbit/s (full speed): QEMU's plain EHCI (ehci, the reference's usb-ehci) has high-speed ports only" in warning
    assert ok(controller({"domain": name, "model": "ich9-ehci1"}, devices=REFERENCE + [KEYBOARD]))["warnings"] == []


def test_no_speed_warnings_without_pyudev(domains, tmp_path):
    # A module path entry that shadows pyudev with a module failing to import, as on a host without it.
    (tmp_path / "pyudev.py").write_text("raise ImportError('no pyudev here')\n")
    name = domains.define("no-pyudev", devices=[KINGSTON_HOSTDEV.format(address="")])
    result = run_module("qemu_usb_controller", {"domain": name, "model": "ehci", "uri": URI}, devices=REFERENCE, python_path=[str(tmp_path)])
    assert ok(result)["changed"] is True
    assert result["warnings"] == []


# Running domains


def test_running_domain_needs_a_restart(domains, can_start):
    name = domains.define("running")
    domains.conn.lookupByName(name).create()
    result = ok(controller({"domain": name, "model": "ehci"}))
    assert result["changed"] is True
    assert result["restart_required"] is True
    # The persistent definition is done; the running domain still reports the restart it needs.
    again = ok(controller({"domain": name, "model": "ehci"}))
    assert again["changed"] is False
    assert again["restart_required"] is True


def test_restart_gives_the_running_domain_the_new_controller(domains, can_start):
    name = domains.define("restart", devices=[TABLET.format(address="")])
    domain = domains.conn.lookupByName(name)
    domain.create()
    predicted = ok(controller({"domain": name, "model": "usb-ehci", "restart": True, "shutdown_timeout": 1}, check_mode=True))
    assert (predicted["changed"], predicted["restarted"], predicted["restart_required"]) == (True, True, False)
    assert "model='qemu-xhci'" in domain.XMLDesc(0)

    # Diskless, the guest has no OS to answer the ACPI shutdown: it is forced off after the timeout.
    result = ok(controller({"domain": name, "model": "usb-ehci", "restart": True, "shutdown_timeout": 1}))
    assert (result["changed"], result["restarted"], result["restart_required"]) == (True, True, False)
    assert result["warnings"] == ["Domain %s did not shut down within 1 s; it was forced off" % name]
    assert domain.isActive()
    named, _anonymous = _controller.qemu_devices(domain)
    assert named["usb"] == "usb-ehci"
    assert ok(controller({"domain": name, "model": "usb-ehci", "restart": True}))["changed"] is False


def test_transient_domain_is_refused(domains, can_start):
    name = PREFIX + "transient"
    domains.names.append(name)
    domains.conn.createXML(DOMAIN_XML.format(name=name, controller="", devices="", machine="pc", metadata=""))
    failed(controller({"domain": name, "model": "ehci"}), "is transient: it has no persistent definition")


# restart() and the QEMU check, with stand-ins for a guest that does or does not shut down


class FakeDomain:
    def __init__(self, stops_after=None, qemu=None, live_xml=""):
        self.active = True
        self.stops_after = stops_after
        self.calls = []
        self.qemu = qemu or {}
        self.live_xml = live_xml

    def shutdown(self):
        self.calls.append("shutdown")

    def isActive(self):
        if self.stops_after is not None:
            self.stops_after -= 1
            if self.stops_after < 0:
                self.active = False
        return self.active

    def destroy(self):
        self.calls.append("destroy")
        self.active = False

    def create(self):
        self.calls.append("create")
        self.active = True

    def XMLDesc(self, flags):
        return self.live_xml


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_restart_waits_for_a_guest_that_shuts_down():
    domain = FakeDomain(stops_after=3)
    clock = Clock()
    assert _controller.restart(domain, 10, sleep=clock.sleep, clock=clock) is False
    assert domain.calls == ["shutdown", "create"]


def test_restart_forces_off_a_guest_that_does_not_shut_down():
    domain = FakeDomain()
    clock = Clock()
    assert _controller.restart(domain, 2, sleep=clock.sleep, clock=clock) is True
    assert domain.calls == ["shutdown", "destroy", "create"]
    assert clock.now == 2.0


class FakeMonitor:
    def qemuMonitorCommand(self, domain, command, flags):
        path = json.loads(command)["arguments"]["path"]
        return json.dumps(
            {"return": [{"name": name, "type": "child<%s>" % type_} for name, type_ in domain.qemu.get(path, [])] + [{"name": "type", "type": "string"}]}
        )


LIVE_EHCI = "<domain><devices><controller type='usb' index='0' model='ehci'><alias name='usb'/></controller></devices></domain>"


def test_verify_in_qemu_accepts_the_controller_qemu_has(monkeypatch):
    monkeypatch.setattr(_controller, "libvirt_qemu", FakeMonitor())
    domain = FakeDomain(qemu={"/machine/peripheral": [("usb", "usb-ehci"), ("input0", "usb-tablet")]}, live_xml=LIVE_EHCI)
    _controller.verify_in_qemu(domain, _controller.Request(model="ehci"))


def test_verify_in_qemu_fails_when_qemu_has_another_controller(monkeypatch):
    monkeypatch.setattr(_controller, "libvirt_qemu", FakeMonitor())
    domain = FakeDomain(qemu={"/machine/peripheral": [("usb", "qemu-xhci")]}, live_xml=LIVE_EHCI)
    with pytest.raises(_controller.ControllerError) as error:
        _controller.verify_in_qemu(domain, _controller.Request(model="ehci"))
    assert str(error.value) == "Domain restarted, but its QEMU has qemu-xhci as USB controller usb, not usb-ehci (USB controllers in QEMU: qemu-xhci)"
    assert error.value.changed is True


def test_verify_in_qemu_wants_the_ich9_companions(monkeypatch):
    monkeypatch.setattr(_controller, "libvirt_qemu", FakeMonitor())
    live = LIVE_EHCI.replace("model='ehci'", "model='ich9-ehci1'")
    complete = FakeDomain(
        qemu={
            "/machine/peripheral": [("usb", "ich9-usb-ehci1")],
            "/machine/peripheral-anon": [("device[0]", "ich9-usb-uhci1"), ("device[1]", "ich9-usb-uhci2"), ("device[2]", "ich9-usb-uhci3")],
        },
        live_xml=live,
    )
    _controller.verify_in_qemu(complete, _controller.Request(model="ich9-ehci1"))
    partial = FakeDomain(qemu={"/machine/peripheral": [("usb", "ich9-usb-ehci1")]}, live_xml=live)
    with pytest.raises(_controller.ControllerError, match="lacks the EHCI companions ich9-usb-uhci1, ich9-usb-uhci2, ich9-usb-uhci3"):
        _controller.verify_in_qemu(partial, _controller.Request(model="ich9-ehci1"))


def test_metadata_holding_a_devices_element_is_left_alone():
    xml = (
        "<domain type='qemu'>\n"
        "  <name>x</name>\n"
        "  <metadata>\n"
        '    <inventory xmlns="urn:example:inventory">\n'
        "      <devices>\n"
        "        <controller type='usb' index='0' model='qemu-xhci'/>\n"
        "      </devices>\n"
        "    </inventory>\n"
        "  </metadata>\n"
        "  <devices>\n"
        "    <controller type='usb' index='0' model='qemu-xhci'/>\n"
        "  </devices>\n"
        "</domain>\n"
    )
    plan = _controller.plan(xml, _controller.Request(model="ehci"))
    assert plan.xml() == xml.replace(
        "  <devices>\n    <controller type='usb' index='0' model='qemu-xhci'/>\n  </devices>",
        '  <devices>\n    <controller type="usb" index="0" model="ehci" />\n  </devices>',
    )
