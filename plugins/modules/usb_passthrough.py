#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_passthrough
short_description: Converge the declared USB passthrough of a whole KVM host in one call
version_added: 0.1.0
description:
  - Makes the libvirt domains of the managed host hold the USB devices declared for them, all domains in one
    pass (one enumeration of the devices, one host lock, one read of every domain, one plan).
  - Every device that leaves a domain is detached (live, then persistent) before any device arrives anywhere, so
    moves, swaps and rotations among the declared domains need no O(steal), and no device is ever in two guests.
  - A declaration that contradicts itself fails before anything changes, naming what is wrong; the same for a
    selector that is malformed or ambiguous, and for a declared domain the host does not have.
  - A device that another, undeclared domain holds is refused unless O(steal=true). With O(whole_host=true)
    the declaration is the host's whole truth.
  - A declared device that is not plugged in but named by its full id (C(vvvv:pppp:SERIAL)) is not an error.
    Its intent is recorded and a warning says it is missing; the reattach agent attaches it when it appears.
  - When libvirt refuses a step, the steps of the pass already made are undone across all domains, and the
    message says what was left as it was.
  - A device the pass attaches that is unplugged while the pass runs fails it the same way, naming the device; one
    it only takes away does not, and a warning names it. A domain that stops running during the pass gets the
    persistent part and the intent, with a warning.
  - Which hostdev stands for which device, who holds what, and the drift are answered by one host model, the same
    that M(kvmhost.usb.usb_facts), the P(kvmhost.usb.usb_drift#filter) filter and the reattach agent use. Intent
    entries record the device's serial, port and bound address beside its id, so a twin with the same serial
    plugged in beside a held device never takes its place, and a persistent hostdev that stops designating
    exactly one device is pinned to its address again.
  - A device declared with C(host) is imported from that host over USB/IP before the plan (see the notes). It stays only
    while declared; an intent entry of an imported device that the declaration no longer names is detached from its
    domain, and an import no domain claims any more is released.
  - Check mode is the probe, like Cloudpods' C(host-probe-isolated-devices). It changes nothing and returns
    RV(drift) and the RV(actions) a run would make.
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
    details: Nothing is changed; RV(actions), RV(domains) and the diff say what would change, RV(drift) how the host differs.
  diff_mode:
    support: full
    details: Shows the hostdevs and the intent of every domain the run changes, before and after.
options:
  domains:
    description:
      - The declared state, the role R(kvmhost.usb.passthrough,ansible_collections.kvmhost.usb.passthrough_role)'s
        C(usb_passthrough) as it is, domain name (or UUID) to its settings.
      - C(devices) is the list of selectors (see the notes).
      - C(exclusive) (default V(false)) makes the domain hold exactly C(devices); other USB devices it holds, stale
        and hand-written hostdevs included, are taken away.
      - C(auto_start) (default V(false)) starts the domain afterwards when it is not running.
      - C(steal) (default V(false)) is O(steal) for this domain's devices only.
      - C(controller) is accepted and ignored here; the role applies it with M(kvmhost.usb.qemu_usb_controller).
      - Domains the host has but O(domains) does not name are left alone, unless O(whole_host=true) or they hold a
        declared device and O(steal=true).
    type: dict
    default: {}
  steal:
    description:
      - Take a declared device from a domain outside the declaration that holds it, instead of failing.
      - Moves among declared domains never need it.
    type: bool
    default: false
  whole_host:
    description:
      - The declaration is the host's whole truth. A domain not in O(domains) loses the USB devices and intent it has,
        and every declared domain holds exactly its C(devices), as with C(exclusive).
    type: bool
    default: false
  allow_host_critical:
    description:
      - Pass through a device that backs a mounted filesystem of the host. Refused otherwise.
    type: bool
    default: false
notes:
  - The host lock file can be moved with the environment variable E(KVMHOST_USB_LOCK); it exists for tests.
  - RV(drift) describes the host as the run found it, before its changes.
seealso:
  - module: kvmhost.usb.usb_attach
  - module: kvmhost.usb.usb_detach
  - module: kvmhost.usb.usb_facts
"""

EXAMPLES = r"""
- name: Each VM of the host holds its declared devices; buildvm and testvm swap their dongles without steal
  kvmhost.usb.usb_passthrough:
    domains:
      buildvm:
        devices: ["0529:0001:1A2B3C"]
      testvm:
        devices:
          - vendor_id: "0403"
            product_id: "6001"
            port: "1-5.1"
        exclusive: true
        auto_start: true

- name: The inventory is the host's whole truth; other VMs lose their USB devices
  kvmhost.usb.usb_passthrough:
    domains: "{{ usb_passthrough }}"
    whole_host: true

- name: Probe (check mode changes nothing)
  kvmhost.usb.usb_passthrough:
    domains: "{{ usb_passthrough }}"
  check_mode: true
  register: probe

- name: Show how the host drifted from its declaration
  ansible.builtin.debug:
    msg: "{{ probe.drift.summary }}"
"""

RETURN = r"""
actions:
  description: What the run changed, or in check mode would change, in the order it was (or would be) done.
  returned: success
  type: list
  elements: str
  sample:
    - "detach from g1 (live): <hostdev mode=\"subsystem\" type=\"usb\">...</hostdev>"
    - "attach to g2 (live): <hostdev mode=\"subsystem\" type=\"usb\">...</hostdev>"
    - "record the intent of g2 (persistent): 0951:1666:E0D55EA5741AF160B9740A81"
domains:
  description: Each declared domain, and each other domain the run changed, by name.
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
      description: C(running), C(shutoff), ... afterwards.
      type: str
    actions:
      description: The RV(actions) that concern this domain.
      type: list
      elements: str
    devices:
      description: Ids of the devices declared for it.
      type: list
      elements: str
drift:
  description:
    - How the host differed from the declaration and from its domains' intent when the run began; the report the
      P(kvmhost.usb.usb_drift#filter) filter gives from facts (see there for every key), without what the host has
      (its C(devices), C(tree) and the summary's C(present)), which M(kvmhost.usb.usb_facts) reports.
    - Also returned when the declaration is refused, so a probe can report it.
  returned: always
  type: dict
  contains:
    drift:
      description: Whether anything differed.
      type: bool
    summary:
      description: The report in lines to read.
      type: dict
    missing:
      description: Declared devices that are not plugged in.
      type: list
      elements: dict
    unstartable:
      description: Domains whose persistent configuration libvirt would refuse to start, with the reason.
      type: list
      elements: dict
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _module, _passthrough


def main():
    module = AnsibleModule(
        argument_spec=dict(
            domains=dict(type="dict", default={}),
            steal=dict(type="bool", default=False),
            whole_host=dict(type="bool", default=False),
            allow_host_critical=dict(type="bool", default=False),
            uri=dict(type="str", default="qemu:///system"),
        ),
        supports_check_mode=True,
    )
    _module.require_libraries(module)
    params = module.params
    _module.run(
        module,
        lambda conn: _passthrough.Planner(conn, params["uri"], module.check_mode, module._diff).converge(
            params["domains"], steal=params["steal"], whole_host=params["whole_host"], allow_host_critical=params["allow_host_critical"]
        ),
    )


if __name__ == "__main__":
    main()
