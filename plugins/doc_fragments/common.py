# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:

    LIBVIRT = r"""
options:
  uri:
    description:
      - The libvirt connection URI on the managed host.
    type: str
    default: qemu:///system
requirements:
  - libvirt-python on the managed host (Debian/Ubuntu and RHEL family package C(python3-libvirt)).
"""

    PYUDEV = r"""
options: {}
requirements:
  - pyudev on the managed host (Debian/Ubuntu and RHEL family package C(python3-pyudev)).
"""

    SELECTOR = r"""
options: {}
notes:
  - >-
    A device selector is a dict with any of the keys C(id), C(vendor_id), C(product_id), C(serial),
    C(port) and C(address); every key given must match, and exactly one device of the host must match.
    For ad-hoc commands a selector may also be a string: an C(id), C(vvvv:pppp), C(BBB:DDD) or a port path such as C(2-1.4).
  - >-
    A selector with C(host) (the inventory name of another KVM host, for example C({host: kvm1, id: "0529:0001:1A2B3C"}))
    chooses a device plugged into that host: its other keys apply there. The device is imported over USB/IP from the
    exporting host's C(link_address) and is then a USB device of this host (see the collection's C(docs/crosshost.md));
    the exporting host must export it to this one (the R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role)
    role does, from the inventory, or M(kvmhost.usb.usb_export)). In a playbook the action plugin fills in C(link_address) from
    the inventory (C(usb_link_address), else C(ansible_host), of that host) and C(link_port) (its C(usb_link_port), when set;
    3240 otherwise), fails for a host not in the inventory, and drops C(host) when it names the managed host itself. Ad hoc
    through the module alone, give C(link_address) (and C(link_port) for an exporter on another port) too.
    Check mode imports nothing and reports the import it would make.
  - >-
    Quote vendor and product ids in YAML (C(vendor_id: "0627")): an unquoted C(0627) is read as an octal number.
  - Hubs and root hubs are never passed through.
"""

    ATTRIBUTES = r"""
options: {}
attributes:
  check_mode:
    description: Can run in check_mode and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
"""

    FACTS = r"""
options: {}
attributes:
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
"""
