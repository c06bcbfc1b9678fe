#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_facts
short_description: List the USB devices of a KVM host, with stable ids and the VMs holding them
version_added: 0.1.0
description:
  - Enumerates the USB devices of the managed host from udev (through pyudev; no C(lsusb) is run),
    like C(lsusb) and Cloudpods' C(climc isolated-device-list --details).
  - Reports which libvirt domains hold each device, in their running (live) and persistent configuration.
    When libvirt cannot be reached the devices are still returned, with a warning.
  - Reads back the Cloudpods host agent's C(disable_usb) setting from C(host_conf).
  - "Device ids are stable: the same after a re-run, a reboot and a replug. The rule:
    C(vvvv:pppp:SERIAL) when the device has a serial number that no other device of the same
    vendor:product on the host shares; C(vvvv:pppp@PORT) otherwise, PORT being the sysfs port path
    (for example C(0627:0001@1-2)). Characters of the serial other than letters, digits and C(. _ ~ -)
    are percent-encoded. A serial-based id follows the device into any port; a port-based id belongs
    to the port."
  - Devices used across hosts (see the collection's C(docs/crosshost.md)) say so. On the exporting host, a device its
    exports table (C(/etc/kvmhost-usb/exports.json), written by M(kvmhost.usb.usb_export)) exports has RV(ansible_facts.usb_devices[].exported_to);
    on the consuming host, a device imported over USB/IP has RV(ansible_facts.usb_devices[].imported_from).
author:
  - kvmhost.usb contributors (!UNKNOWN)
extends_documentation_fragment:
  - kvmhost.usb.common.libvirt
  - kvmhost.usb.common.pyudev
  - kvmhost.usb.common.attributes
  - kvmhost.usb.common.facts
notes:
  - The environment variables E(KVMHOST_USB_EXPORTS) and E(KVMHOST_USB_IMPORTS) move the exports table and the
    directory of import records (C(/run/kvmhost-usb/imports)); they exist for tests.
attributes:
  check_mode:
    support: full
    details: The module only reads.
  diff_mode:
    support: none
  facts:
    support: full
options:
  host_conf:
    description:
      - Path of the Cloudpods host agent configuration whose C(disable_usb) setting is reported.
    type: path
    default: /etc/yunion/host.conf
  include_hubs:
    description:
      - Also list hubs and root hubs in C(ansible_facts.usb_devices). The topology always has them.
    type: bool
    default: false
  vendor_id:
    description:
      - Only list devices with this vendor id (4 hex digits, quote it in YAML).
    type: str
  product_id:
    description:
      - Only list devices with this product id (4 hex digits, quote it in YAML).
    type: str
  serial:
    description:
      - Only list devices with this serial number.
    type: str
  port:
    description:
      - Only list the device at this port path, for example C(2-1.4).
    type: str
  domains_only:
    description:
      - Return RV(ansible_facts.usb_domain_states) alone, from one listing of the libvirt domains, reading no USB
        device and no domain XML (pyudev is not needed). Where the domains are defined and running, as the
        R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role) role asks it to place the
        domains of C(usb_fleet).
      - Unlike the full read, libvirt out of reach fails the module.
    type: bool
    default: false
    version_added: 0.2.0
"""

EXAMPLES = r"""
- name: Gather the USB devices of the KVM hosts
  kvmhost.usb.usb_facts:

- name: Show them as the reference's isolated-device-list does
  ansible.builtin.debug:
    msg: "{{ item.id }} {{ item.vendor_device_id }} {{ item.address }} {{ item.model }} {{ item.attached_to.live | join(',') }}"
  loop: "{{ ansible_facts.usb_devices }}"

- name: Where the domains are, alone (no USB device read)
  kvmhost.usb.usb_facts:
    domains_only: true

- name: Find the Kingston sticks only
  kvmhost.usb.usb_facts:
    vendor_id: "0951"
    product_id: "1666"

# Ad hoc: ansible kvm1 -m kvmhost.usb.usb_facts -a include_hubs=true
"""

RETURN = r"""
ansible_facts:
  description: Facts added to the host.
  returned: always
  type: dict
  contains:
    usb_devices:
      description: The USB devices of the host, sorted by bus and port; hubs only with O(include_hubs).
      returned: always
      type: list
      elements: dict
      contains:
        id:
          description: Stable device id (see the description for the rule).
          type: str
          sample: "0951:1666:E0D55EA5741A"
        vendor_id:
          description: Vendor id, 4 lowercase hex digits.
          type: str
          sample: "0951"
        product_id:
          description: Product id, 4 lowercase hex digits.
          type: str
          sample: "1666"
        vendor_device_id:
          description: C(vendor_id:product_id).
          type: str
          sample: "0951:1666"
        manufacturer:
          description: The device's manufacturer string, else the USB id database's vendor name.
          type: str
          sample: Kingston
        product:
          description: The device's product string, else the USB id database's product name.
          type: str
          sample: DataTraveler 3.0
        model:
          description: The name C(lsusb) prints (database names, falling back to the device's strings).
          type: str
          sample: Kingston Technology DataTraveler 100 G3/G4/SE9 G2/50
        serial:
          description: Serial number, or null.
          type: str
        bus:
          description: Bus number.
          type: int
          sample: 2
        device:
          description: Device number on the bus; changes on every replug.
          type: int
          sample: 2
        address:
          description: C(BBB:DDD), zero-padded, as Cloudpods prints it.
          type: str
          sample: "002:002"
        port:
          description: sysfs port path (C(usbN) for a root hub).
          type: str
          sample: 2-1.4
        speed:
          description: Speed in Mbit/s.
          type: float
          sample: 5000
        usb_version:
          description: USB version the device declares.
          type: str
          sample: "3.20"
        class:
          description: Device class name, or the interface class names when the device class is per-interface.
          type: list
          elements: str
          sample: [Mass Storage]
        driver:
          description: Drivers bound to the device's interfaces, comma-separated, or null.
          type: str
          sample: usb-storage
        is_hub:
          description: Whether the device is a hub.
          type: bool
        sys_path:
          description: sysfs path of the device.
          type: str
        attached_to:
          description: Domains with a USB hostdev that stands for the device (see M(kvmhost.usb.usb_passthrough) for the rule).
          type: dict
          contains:
            live:
              description: Domains holding it in their running configuration.
              type: list
              elements: str
            persistent:
              description: Domains holding it in their persistent configuration.
              type: list
              elements: str
        exported_to:
          description: Null, or the host and domain this device is exported to over USB/IP, from the exports table.
          type: dict
          contains:
            host:
              description: Inventory name of the consuming host.
              type: str
              sample: kvm2
            domain:
              description: The consuming host's domain that gets the device.
              type: str
              sample: buildvm
            address:
              description: The consuming host's link address, the only peer the exporter serves the device to.
              type: str
              sample: 10.77.0.2
        imported_from:
          description: Null, or where this device was imported from over USB/IP (it is plugged into that host).
          type: dict
          contains:
            host:
              description: Inventory name of the exporting host.
              type: str
              sample: kvm1
            link_address:
              description: The exporting host's link address.
              type: str
              sample: 10.77.0.1
            busid:
              description: The device's port path (bus id) on the exporting host.
              type: str
              sample: 2-1
    usb_topology:
      description: The device tree like C(lsusb -t), hubs included, each node with its C(children).
      returned: always
      type: list
      elements: dict
    usb_domains:
      description:
        - The libvirt domains of the host, each with the USB hostdevs and the passthrough intent (what
          M(kvmhost.usb.usb_attach) recorded in its C(<metadata>)) of its running and persistent configuration.
        - Empty when libvirt cannot be reached.
      returned: always
      type: list
      elements: dict
      contains:
        name:
          description: Domain name.
          type: str
        state:
          description: C(running), C(paused), C(shutoff), ...
          type: str
        live:
          description: The running configuration; null when the domain is not running.
          type: dict
          contains:
            hostdevs:
              description: >-
                The USB hostdevs: C(vendor_id), C(product_id), C(bus), C(device), C(address) (C(BBB:DDD) or null),
                C(startup_policy), C(devices) (ids of the present devices it designates) and C(stale) (true when it names
                a bus/device address at which no such device is present, as after a replug or an unplug).
              type: list
              elements: dict
            intent:
              description:
                - The intent entries, each the device C(id), the C(selector) it was chosen by, and its C(status) in this configuration.
                - C(attached) when a hostdev of the configuration designates the present device (in the running
                  configuration, by its bus/device address); C(missing) when the device is not plugged in (or cannot be told
                  apart from a twin); C(stale) when it is plugged in and no hostdev designates it, as after a replug that the
                  reattach agent has not caught up with.
                - Entries also carry the C(serial), C(port) and bus/device C(address) the device had when
                  it was bound, which find the device again after the id rule changed its id (a twin with the same serial
                  plugged in beside it turns both ids port-based). The entry keeps the id it was recorded with.
              type: list
              elements: dict
        persistent:
          description: The persistent configuration, like RV(ansible_facts.usb_domains[].live); null for a transient domain.
          type: dict
    usb_domain_states:
      description:
        - Each libvirt domain of the host with its C(name), its C(state) (C(running), C(paused), C(shutoff), ...)
          and whether it is C(persistent) (defined; false for a transient domain, such as one migrated in
          without C(--persistent)).
        - Empty when libvirt cannot be reached (without O(domains_only)).
      returned: always
      type: list
      elements: dict
      version_added: 0.2.0
    passthrough_enabled:
      description: >-
        The host agent's setting read back: true for C(disable_usb: false), false when USB passthrough is
        disabled or the setting is missing, null when O(host_conf) is absent.
      returned: always
      type: bool
"""

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _facts, _hostconf, _module, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LibvirtError


def main():
    module = AnsibleModule(
        argument_spec=dict(
            uri=dict(type="str", default="qemu:///system"),
            host_conf=dict(type="path", default="/etc/yunion/host.conf"),
            include_hubs=dict(type="bool", default=False),
            vendor_id=dict(type="str"),
            product_id=dict(type="str"),
            serial=dict(type="str"),
            port=dict(type="str"),
            domains_only=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    if module.params["domains_only"]:
        _module.require_libraries(module, pyudev=False)
        try:
            states = _facts.domain_states(module.params["uri"])
        except LibvirtError as error:
            module.fail_json(msg=str(error))
        module.exit_json(changed=False, ansible_facts=dict(usb_domain_states=states))
    if _usb.pyudev is None:
        module.fail_json(msg=missing_required_lib(_usb.PYUDEV_REQUIREMENT), exception=_usb.PYUDEV_IMPORT_ERROR)

    filters = dict((key, module.params[key]) for key in ("vendor_id", "product_id", "serial", "port") if module.params[key])
    try:
        filters = _declaration.normalize_selector(filters) if filters else {}
    except _usb.SelectorError as error:
        module.fail_json(msg=str(error))

    host = _facts.gather(module.params["uri"], module.params["include_hubs"], filters)
    for warning in host["warnings"]:
        module.warn(warning)
    module.exit_json(
        changed=False,
        ansible_facts=dict(
            usb_devices=host["devices"],
            usb_topology=host["topology"],
            usb_domains=host["domains"],
            usb_domain_states=host["domain_states"],
            passthrough_enabled=_hostconf.passthrough_enabled(module.params["host_conf"]),
        ),
    )


if __name__ == "__main__":
    main()
