#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: qemu_usb_controller
short_description: Choose the USB controller of a libvirt domain, such as USB 2 (EHCI) for old guests
version_added: 0.1.0
description:
  - Sets the model of a libvirt domain's USB controller in its persistent definition, like Cloudpods'
    C(climc server-set-qemu-params VM --usb-controller-type usb-ehci|qemu-xhci).
  - Old guests such as Windows 7 and Windows Server 2008 R2 have no driver for C(qemu-xhci) (USB 3);
    they need USB 2 (EHCI).
  - The old controller's PCI address is dropped, so libvirt assigns a fresh one. USB devices (hostdevs,
    USB input devices, hubs) stay on the bus; a device whose USB port the new controller does not have
    loses that port address and libvirt assigns it a free port (RV(readdressed)).
  - V(ich9-ehci1) is set up as libvirt's USB2 with companions, the ICH9 EHCI controller with its three
    C(ich9-uhci) companion controllers, which carry the full- and low-speed devices (keyboards, mice,
    serial adapters). V(ehci) (the reference's C(usb-ehci)) is QEMU's plain EHCI, which has high-speed
    ports only.
  - A running domain gets the new controller at its next cold start only (RV(restart_required)).
    With O(restart=true) the module shuts it down (forced off after O(shutdown_timeout)), starts it and
    checks in its QEMU that the new controller is there. A domain that is shut off is not started.
  - Warns when a USB hostdev of the domain is attached to the host at a speed the new controller does
    not carry as it is (a SuperSpeed device on EHCI or UHCI, a full-speed device on plain EHCI), and
    when the domain's libosinfo metadata names Windows 7 / Server 2008 R2 or older with an xHCI model.
    The speed warnings need pyudev; without it they are left out.
  - Changes are serialised on the host with usb_attach and usb_detach by a lock (C(/run/lock/kvmhost-usb.lock)).
author:
  - kvmhost.usb contributors (!UNKNOWN)
extends_documentation_fragment:
  - kvmhost.usb.common.libvirt
  - kvmhost.usb.common.attributes
attributes:
  check_mode:
    support: full
    details: Nothing is changed; the result (RV(controller), RV(restarted)) and the diff say what would change.
  diff_mode:
    support: full
    details: Shows the USB controller elements, and the devices that lose their USB port, before and after.
options:
  domain:
    description:
      - Name or UUID of the libvirt domain.
    type: str
    required: true
  model:
    description:
      - The USB controller model, as libvirt names it.
      - V(qemu-xhci) and V(nec-xhci) are USB 3 (xHCI); V(ich9-ehci1) and V(ehci) are USB 2;
        V(piix3-uhci), V(piix4-uhci) and V(pci-ohci) are USB 1.1; V(none) removes USB from the domain
        (index 0 only, and the domain must have no USB devices).
      - QEMU's device names are accepted as aliases, the reference's V(usb-ehci) among them
        (V(usb-ehci) is V(ehci), V(nec-usb-xhci) is V(nec-xhci), V(ich9-usb-ehci1) is V(ich9-ehci1),
        V(piix3-usb-uhci) is V(piix3-uhci), V(piix4-usb-uhci) is V(piix4-uhci)).
    type: str
    required: true
    choices:
      - qemu-xhci
      - nec-xhci
      - ich9-ehci1
      - ehci
      - piix3-uhci
      - piix4-uhci
      - pci-ohci
      - none
      - usb-ehci
      - nec-usb-xhci
      - ich9-usb-ehci1
      - piix3-usb-uhci
      - piix4-usb-uhci
  index:
    description:
      - Index of the USB controller (the C(bus) of the devices' USB addresses). A domain without a USB
        controller of that index gets one.
    type: int
    default: 0
  ports:
    description:
      - Number of root ports of an xHCI controller (V(qemu-xhci), V(nec-xhci)), 1 to 15; libvirt's
        default is 4. Other models have a fixed number (EHCI 6, UHCI 2, OHCI 3) and take no O(ports).
      - When not given, an xHCI controller that stays xHCI keeps its number of ports.
    type: int
  restart:
    description:
      - Restart a running domain whose running controller is not the one asked for, so that it gets it now,
        and check in QEMU that it has it.
    type: bool
    default: false
  shutdown_timeout:
    description:
      - Seconds to wait for the guest to shut down (ACPI) before the domain is forced off, with O(restart=true).
    type: int
    default: 120
notes:
  - A second run with the same options reports no change. A running domain keeps reporting
    RV(restart_required) until it has been shut down and started again.
seealso:
  - name: libvirt domain XML, controllers
    description: The USB controller models and their attributes.
    link: https://libvirt.org/formatdomain.html#controllers
"""

EXAMPLES = r"""
- name: Give the Windows Server 2008 R2 guest USB 2 and restart it now
  kvmhost.usb.qemu_usb_controller:
    domain: win2k8r2
    model: usb-ehci
    restart: true
    shutdown_timeout: 300

- name: USB 2 with UHCI companions, so that keyboards and serial adapters work too
  kvmhost.usb.qemu_usb_controller:
    domain: legacy-app
    model: ich9-ehci1
  register: usb_controller

- name: Tell when the new controller waits for a cold start
  ansible.builtin.debug:
    msg: "legacy-app gets {{ usb_controller.controller.after.model }} at its next cold start"
  when: usb_controller.restart_required

- name: USB 3 with 15 ports
  kvmhost.usb.qemu_usb_controller:
    domain: build-agent
    model: qemu-xhci
    ports: 15
"""

RETURN = r"""
controller:
  description: The USB controller of O(index) in the persistent definition, before and after.
  returned: always
  type: dict
  contains:
    index:
      description: The controller index.
      type: int
      sample: 0
    before:
      description: Model and ports before; the model is null when the domain had no USB controller of that index.
      type: dict
      sample: {"model": "qemu-xhci", "ports": null}
    after:
      description: Model and ports after (in check mode, as they would be).
      type: dict
      sample: {"model": "ehci", "ports": null}
restart_required:
  description:
    - Whether the domain is running with another USB controller than its persistent definition has,
      after this task; it gets the new one at its next cold start (a reboot from inside the guest is not enough).
  returned: always
  type: bool
restarted:
  description: Whether the domain was (in check mode, would be) shut down and started again.
  returned: always
  type: bool
readdressed:
  description: Devices that lost their USB port address because the new controller lacks that port; libvirt gave them a free one.
  returned: always
  type: list
  elements: dict
  contains:
    device:
      description: The device element in short.
      type: str
      sample: input bus=usb type=tablet
    bus:
      description: The USB bus (controller index) of the old address.
      type: int
    port:
      description: The old port.
      type: str
      sample: "7"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _controller, _module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            model=dict(type="str", required=True, choices=list(_controller.CHOICES)),
            index=dict(type="int", default=0),
            ports=dict(type="int"),
            restart=dict(type="bool", default=False),
            shutdown_timeout=dict(type="int", default=120),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    _module.require_libraries(module, pyudev=False)
    params = module.params
    request = _controller.Request(
        model=_controller.canonical_model(params["model"]),
        index=params["index"],
        ports=params["ports"],
        restart=params["restart"],
        shutdown_timeout=params["shutdown_timeout"],
    )
    _module.run(module, lambda conn: _controller.run(conn, params["domain"], request, module.check_mode))


if __name__ == "__main__":
    main()
