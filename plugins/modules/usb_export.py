#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_export
short_description: Export USB devices of a KVM host over USB/IP to the hosts whose domains use them
version_added: 0.1.0
description:
  - Writes the whole list of the managed host's USB/IP exports to its exports table (C(/etc/kvmhost-usb/exports.json)),
    which the exporter service C(kvmhost-usb-exporter) (installed by the role
    R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role)) serves.
  - The exporter binds each exported device to the kernel's C(usbip-host) while it is plugged in, listens on
    O(listen_address) only, and offers each device to the address of its importer alone; a connection from any
    other address is closed at once. A device dropped from the list is given back to its own driver.
  - The role computes the list from the other hosts' C(usb_passthrough) (selectors with C(host) naming this host) and
    runs this module before M(kvmhost.usb.usb_passthrough).
  - Refused, with nothing changed, is an export whose device is not plugged in on this host, is held by a local domain
    (live, persistent or in its intent), is declared for a local domain in O(local_domains), or is named by two
    exports.
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
    details: Nothing is written; RV(exports) and the diff say what the table would be.
  diff_mode:
    support: full
    details: The exports table before and after, as JSON.
options:
  exports:
    description:
      - Every export of the host. Each is a device selector (its fields C(id), C(vendor_id), C(product_id), C(serial),
        C(port), C(address)) with C(importer) (the inventory name of the host that uses the device), C(importer_address)
        (the address that host connects from, its C(usb_link_address)) and C(domain) (the domain there that uses it).
      - An empty list removes every export.
    type: list
    elements: dict
    required: true
  listen_address:
    description:
      - The address the exporter listens on, this host's C(usb_link_address). Never a wildcard address in practice.
    type: str
    required: true
  port:
    description: The TCP port of the exporter.
    type: int
    default: 3240
  local_domains:
    description:
      - This host's own declaration, the role's C(usb_passthrough) as it is. A device it declares for a local domain is
        not exported. Selectors with C(host) (devices this host imports) are ignored here.
    type: dict
    default: {}
notes:
  - The exports table can be moved with the environment variable E(KVMHOST_USB_EXPORTS); it exists for tests.
  - USB/IP neither authenticates nor encrypts. Keep O(listen_address) on a link only the KVM hosts reach.
seealso:
  - module: kvmhost.usb.usb_passthrough
  - module: kvmhost.usb.usb_facts
"""

EXAMPLES = r"""
- name: Export the licence dongle of kvm1 to buildvm on kvm2
  kvmhost.usb.usb_export:
    listen_address: 10.77.0.1
    exports:
      - id: "0529:0001:1A2B3C"
        importer: kvm2
        importer_address: 10.77.0.2
        domain: buildvm

- name: Remove every export of the host
  kvmhost.usb.usb_export:
    listen_address: 10.77.0.1
    exports: []
"""

RETURN = r"""
exports:
  description: The exports as written (or in check mode as they would be), each with its device.
  returned: success
  type: list
  elements: dict
  contains:
    id:
      description: The device's id on this host.
      type: str
    busid:
      description: The device's port path here, its USB/IP bus id.
      type: str
    selector:
      description: The normalised selector.
      type: dict
    importer:
      description: The host that imports the device.
      type: str
    importer_address:
      description: The only address the device is offered to.
      type: str
    domain:
      description: The domain on the importer that uses the device.
      type: str
path:
  description: The exports table.
  returned: success
  type: str
  sample: /etc/kvmhost-usb/exports.json
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _exports, _module


def main():
    module = AnsibleModule(
        argument_spec=dict(
            exports=dict(type="list", elements="dict", required=True),
            listen_address=dict(type="str", required=True),
            port=dict(type="int", default=3240),
            local_domains=dict(type="dict", default={}),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    _module.require_libraries(module)
    params = module.params
    _module.run(
        module,
        lambda conn: _exports.converge(
            conn, params["uri"], params["exports"], params["listen_address"], params["port"], params["local_domains"], module.check_mode
        ),
    )


if __name__ == "__main__":
    main()
