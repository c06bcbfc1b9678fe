#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_detach
short_description: Take USB devices of a KVM host back from libvirt domains, live and persistent
version_added: 0.1.0
description:
  - Detaches USB devices of the managed host from libvirt domains, like Cloudpods'
    C(climc server-detach-isolated-device VM DEV).
  - Each device is chosen by a selector that must match exactly one device of the host (see the notes).
    A selector that matches no plugged-in device still detaches the device a domain's intent names
    (by the same id or the same selector), with the hostdevs left for it.
  - The device leaves the running domain, its persistent configuration and the intent recorded in its
    C(<metadata>). Without O(domain) it leaves whichever domains hold it.
  - Detaching a device that is not attached changes nothing and is not an error.
  - A device imported from another KVM host (a selector with C(host)) is detached the same way, and its USB/IP import
    is released once no domain of the host claims it any more.
  - Changes are made live first, then in the persistent configuration, then in the intent; when libvirt
    refuses a step, the steps already made are undone and libvirt's message is reported.
  - A device unplugged while it is detached is detached all the same (a detach needs no device), with a warning
    naming it.
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
  devices:
    description:
      - The devices to detach, each a selector (see the notes).
    type: list
    elements: raw
    required: true
  domain:
    description:
      - Name or UUID of the libvirt domain to take the devices from.
      - Without it, the devices are taken from whichever domains hold them.
    type: str
  auto_start:
    description:
      - Start the domain afterwards when it is not running (with O(domain)), or every domain the devices were taken from.
    type: bool
    default: false
notes:
  - The host lock file can be moved with the environment variable E(KVMHOST_USB_LOCK); it exists for tests.
seealso:
  - module: kvmhost.usb.usb_attach
  - module: kvmhost.usb.usb_facts
"""

EXAMPLES = r"""
- name: Take the Kingston stick back from testvm
  kvmhost.usb.usb_detach:
    domain: testvm
    devices:
      - vendor_id: "0951"
        product_id: "1666"

- name: Take a device back from whichever VM holds it
  kvmhost.usb.usb_detach:
    devices: ["0627:0001:42"]

# Ad hoc: ansible kvm1 -m kvmhost.usb.usb_detach -a 'devices=002:005'
"""

RETURN = r"""
devices:
  description: The plugged-in devices the selectors chose, as M(kvmhost.usb.usb_facts) describes them, with the domains holding them afterwards.
  returned: success
  type: list
  elements: dict
domain:
  description: The domain given in O(domain), with its state afterwards; null without O(domain).
  returned: success
  type: dict
  contains:
    name:
      description: Domain name.
      type: str
    uuid:
      description: Domain UUID.
      type: str
    state:
      description: C(running), C(paused), C(shutoff), ...
      type: str
domains:
  description: The domains the devices were (or in check mode would be) taken from, with their state afterwards.
  returned: success
  type: list
  elements: dict
actions:
  description: What the run changed, or in check mode would change, in order.
  returned: success
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _module, _passthrough


def main():
    module = AnsibleModule(
        argument_spec=dict(
            devices=dict(type="list", elements="raw", required=True),
            domain=dict(type="str"),
            auto_start=dict(type="bool", default=False),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    _module.require_libraries(module)
    params = module.params

    def detach(conn):
        selectors = _declaration.normalize_selectors(params["devices"])
        return _passthrough.Planner(conn, params["uri"], module.check_mode, module._diff).detach(params["domain"], selectors, auto_start=params["auto_start"])

    _module.run(module, detach)


if __name__ == "__main__":
    main()
