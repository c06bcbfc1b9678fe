#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_attach
short_description: Pass USB devices of a KVM host through to one libvirt domain, live and persistent
version_added: 0.1.0
description:
  - Attaches USB devices of the managed host to a libvirt domain, like Cloudpods'
    C(climc server-attach-isolated-device VM DEV).
  - Each device is chosen by a selector that must match exactly one device of the host (see the notes).
  - A running domain gets the device hot-attached, at its exact bus/device address, and also in its
    persistent configuration unless O(persistent=false). A stopped domain gets it in its persistent
    configuration; O(auto_start=true) then starts the domain.
  - The persistent C(<hostdev>) names the device by vendor:product when no other device of the host has
    the same vendor:product, so the domain still finds it after a replug gave it a new device number; it
    adds the bus/device address only when it must. It is written with C(startupPolicy=optional), so
    the domain still starts while the device is unplugged.
  - The intent (the selector and the device id it resolved to) is recorded in the domain's C(<metadata>)
    under the namespace C(http://kvmhost.usb/ns/passthrough/1). A later run re-binds a hostdev whose
    device changed its device number (after a replug) to the new address.
  - One device goes to one VM. When another domain holds the device, live or persistent, or declares it in
    its intent, the module fails naming that domain; O(steal=true) detaches it there first. Changes
    are serialised on the host by a lock (C(/run/lock/kvmhost-usb.lock)), so two runs attaching the
    same device to two domains at the same time cannot both succeed.
  - Changes are made live first, then in the persistent configuration, then in the intent; when libvirt
    or QEMU refuses a step, the steps already made are undone and libvirt's message is reported.
  - A selector with C(host) chooses a device of another KVM host, imported over USB/IP first (see the notes); when the
    run fails afterwards, the imports it made are released again.
  - A device unplugged while the change is made fails it, naming the device, and the steps already made are
    undone (a live hostdev of the unplugged device is not given back). A domain that stops running meanwhile
    gets the persistent part and the intent, as a stopped domain would, and a warning says so; with
    O(persistent=false) that fails instead, changing nothing.
author:
  - kvmhost.usb contributors (!UNKNOWN)
extends_documentation_fragment:
  - kvmhost.usb.common.libvirt
  - kvmhost.usb.common.pyudev
  - kvmhost.usb.common.selector
  - kvmhost.usb.common.attributes
attributes:
  check_mode:
    support: full
    details: Nothing is changed; RV(actions) and the diff say what would change.
  diff_mode:
    support: full
    details: Shows the hostdevs and the intent of every domain the run changes, before and after.
options:
  domain:
    description:
      - Name or UUID of the libvirt domain that gets the devices.
    type: str
    required: true
  devices:
    description:
      - The devices to attach, each a selector (see the notes).
    type: list
    elements: raw
    required: true
  persistent:
    description:
      - Also attach to the persistent configuration of a running domain.
      - With V(false) the attachment lasts until the domain stops; the domain must be running.
    type: bool
    default: true
  auto_start:
    description:
      - Start the domain afterwards when it is not running.
    type: bool
    default: false
  steal:
    description:
      - When another domain holds a device, detach it there (live, persistent and intent) and attach it here.
    type: bool
    default: false
  exclusive:
    description:
      - Also detach every other USB device the domain holds, so that it holds exactly O(devices) afterwards
        (in the configurations the run attaches to, see O(persistent)).
      - This takes away hostdevs that stand for no present device (left by an unplug, or written by hand)
        and intent entries of devices not in O(devices).
      - With V(true), O(devices) may be empty, which takes every USB device from the domain.
    type: bool
    default: false
  allow_host_critical:
    description:
      - Pass through a device that backs a mounted filesystem of the host (directly, or under device
        mapper or md RAID). Refused otherwise.
    type: bool
    default: false
notes:
  - The host lock file can be moved with the environment variable E(KVMHOST_USB_LOCK); it exists for tests.
seealso:
  - module: kvmhost.usb.usb_detach
  - module: kvmhost.usb.usb_facts
"""

EXAMPLES = r"""
- name: Pass the Kingston stick through to testvm (hot when it runs, and persistent)
  kvmhost.usb.usb_attach:
    domain: testvm
    devices:
      - vendor_id: "0951"
        product_id: "1666"

- name: Two identical tablets, chosen by serial and by port; start the VM afterwards
  kvmhost.usb.usb_attach:
    domain: testvm
    devices:
      - vendor_id: "0627"
        product_id: "0001"
        serial: "42"
      - id: "0627:0001@1-3"
    auto_start: true

- name: testvm holds exactly the stick, nothing else (the declared state of the kvmhost.usb.passthrough role)
  kvmhost.usb.usb_attach:
    domain: testvm
    devices: ["0951:1666"]
    exclusive: true

- name: Move the device from whichever VM has it
  kvmhost.usb.usb_attach:
    domain: testvm
    devices: ["0951:1666:E0D55EA5741AF160B9740A81"]
    steal: true

# Ad hoc: ansible kvm1 -m kvmhost.usb.usb_attach -a 'domain=testvm devices=0951:1666'
"""

RETURN = r"""
devices:
  description: The devices the selectors chose, as M(kvmhost.usb.usb_facts) describes them, with the domains holding them afterwards.
  returned: success
  type: list
  elements: dict
  sample:
    - id: "0951:1666:E0D55EA5741AF160B9740A81"
      vendor_device_id: "0951:1666"
      address: "002:002"
      port: "2-1"
      attached_to: {live: [testvm], persistent: [testvm]}
domain:
  description: The domain, with its state afterwards.
  returned: success
  type: dict
  contains:
    name:
      description: Domain name.
      type: str
      sample: testvm
    uuid:
      description: Domain UUID.
      type: str
    state:
      description: C(running), C(paused), C(shutoff), ...
      type: str
      sample: running
actions:
  description: What the run changed, or in check mode would change, in order.
  returned: success
  type: list
  elements: str
  sample:
    - "attach to testvm (live): <hostdev mode=\"subsystem\" type=\"usb\">...</hostdev>"
    - "record the intent of testvm (live): 0951:1666:E0D55EA5741AF160B9740A81"
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _module, _passthrough


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domain=dict(type="str", required=True),
            devices=dict(type="list", elements="raw", required=True),
            persistent=dict(type="bool", default=True),
            auto_start=dict(type="bool", default=False),
            steal=dict(type="bool", default=False),
            allow_host_critical=dict(type="bool", default=False),
            exclusive=dict(type="bool", default=False),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    _module.require_libraries(module)
    params = module.params

    def attach(conn):
        selectors = _declaration.normalize_selectors(params["devices"], allow_empty=params["exclusive"])
        return _passthrough.Planner(conn, params["uri"], module.check_mode, module._diff).attach(
            params["domain"],
            selectors,
            persistent=params["persistent"],
            auto_start=params["auto_start"],
            steal=params["steal"],
            allow_host_critical=params["allow_host_critical"],
            exclusive=params["exclusive"],
        )

    _module.run(module, attach)


if __name__ == "__main__":
    main()
