#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_link
short_description: Make the WireGuard key of a KVM host for its encrypted USB/IP links, on the host itself
version_added: 0.2.0
description:
  - The first half of an encrypted link between KVM hosts that share USB devices. Checks that the host can make one
    (C(wg) from wireguard-tools, C(nft) from nftables, a kernel with the C(wireguard) module, O(link_address) one of its
    own addresses), makes its private key if it has none (or a new one with O(rotate_keys)) and returns the public key
    and the tunnel MTU. The second half, the interface with its peers, is M(kvmhost.usb.usb_runtime)'s O(kvmhost.usb.usb_runtime#module:link).
  - The private key is made on the host by C(wg genkey) into C(/etc/kvmhost-usb/link.key) (mode 0600, root) and never
    leaves it; neither the result nor the diff holds it.
  - When a check fails, nothing is changed and the message names what to install or to set.
author:
  - kvmhost.usb contributors (!UNKNOWN)
extends_documentation_fragment:
  - kvmhost.usb.common.attributes
attributes:
  check_mode:
    support: full
    details: No key is made; RV(public_key) is the present key's, or null when one would be made.
  diff_mode:
    support: none
options:
  link_address:
    description: The host's address on the network between the hosts (C(usb_link_address)); it must be one of its addresses.
    type: str
    required: true
  rotate_keys:
    description: Make a new key even if the host has one. The peers need the new public key (the role passes it on).
    type: bool
    default: false
requirements:
  - wireguard-tools, nftables and iproute2 on the managed host; a kernel with WireGuard (Linux 5.6 or later).
notes:
  - The environment variable E(KVMHOST_USB_RUNTIME_ROOT) puts the key under another root directory; it exists for tests.
seealso:
  - module: kvmhost.usb.usb_runtime
"""

EXAMPLES = r"""
- name: Make this host's link key
  kvmhost.usb.usb_link:
    link_address: 192.168.50.11
  register: link_key

- name: New keys
  kvmhost.usb.usb_link:
    link_address: 192.168.50.11
    rotate_keys: true
"""

RETURN = r"""
public_key:
  description: The public key of the host's link key (base64); null in check mode when a key would be made.
  returned: success
  type: str
mtu:
  description: The tunnel's MTU, the link interface's less WireGuard's headers.
  returned: success
  type: int
  sample: 1420
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _link
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LinkError


def main():
    module = AnsibleModule(
        argument_spec=dict(link_address=dict(type="str", required=True), rotate_keys=dict(type="bool", default=False)),
        supports_check_mode=True,
    )
    root = os.environ.get("KVMHOST_USB_RUNTIME_ROOT", "")
    try:
        _link.check_tools()
        mtu = _link.link_mtu(module.params["link_address"])
        _link.check_kernel()
        key = _link.public_key(root)
        changed = key is None or module.params["rotate_keys"]
        if changed:
            key = None if module.check_mode else _link.make_key(root)
    except LinkError as error:
        module.fail_json(msg=str(error))
    module.exit_json(changed=changed, public_key=key, mtu=mtu)


if __name__ == "__main__":
    main()
