#!/usr/bin/python
# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
module: usb_runtime
short_description: Install the kvmhost.usb host runtime (the reattach agent and the USB/IP exporter) in one step
version_added: 0.2.0
description:
  - Installs C(kvmhost-usb), the one program a KVM host runs between converges, and its services.
    C(kvmhost-usb agent) keeps declared devices attached across unplug, replug and domain start
    (service C(kvmhost-usb-agent)); C(kvmhost-usb exporter) offers this host's exported devices over USB/IP
    (service C(kvmhost-usb-exporter)); C(kvmhost-usb status) says what the host holds, exports and imports and how
    both services are (C(--json) for scripts); C(kvmhost-usb version) prints the version and build hash;
    C(kvmhost-usb events [--since SEQ] [--follow] [--kinds K1,K2]) prints the host's events, one JSON object a line
    (devices added, removed, attached, detached, missing, given back; refusals; the link down and up).
  - The program is built on the host from the collection's own code that this module carries, as one zipapp
    (C(/usr/lib/kvmhost-usb/kvmhost-usb.pyz), on the PATH as C(/usr/local/bin/kvmhost-usb)). The module and the program
    it installs are of one version; the build hash is over the program's sources, so the same collection gives the same
    program on every host.
  - Writes the services' systemd units and the kernel modules loaded at boot (C(vhci-hcd) on a host that imports
    devices, C(usbip-host) on one that exports), restarts a service only when its program or unit changed (or it is not
    running), and enables it. A service not wanted is stopped, disabled and its unit removed.
  - O(state=absent) stops and removes all of it. The agent's code as collection 0.1.0's role copied it
    (C(/usr/local/lib/kvmhost-usb)) is removed either way.
author:
  - kvmhost.usb contributors (!UNKNOWN)
extends_documentation_fragment:
  - kvmhost.usb.common.attributes
attributes:
  check_mode:
    support: full
    details: Nothing is written, started or stopped; RV(changes) says what would be.
  diff_mode:
    support: full
    details: Each file that changes, before and after (the units as text, the program by size and hash).
options:
  state:
    description: Whether the runtime is installed.
    type: str
    choices: [present, absent]
    default: present
  agent:
    description: Whether the reattach agent runs (service C(kvmhost-usb-agent)).
    type: bool
    default: true
  exporter:
    description: Whether the USB/IP exporter runs (service C(kvmhost-usb-exporter)); a host that exports devices needs it.
    type: bool
    default: false
  import_addresses:
    description:
      - The link addresses of the hosts this host imports devices from. The agent's unit admits TCP to these alone,
        and C(vhci-hcd) is loaded at boot when there is any.
    type: list
    elements: str
    default: []
  uri:
    description: The libvirt URI the agent watches.
    type: str
    default: qemu:///system
  agent_period:
    description: Seconds between the agent's full passes when no event comes.
    type: float
    default: 60
  agent_missing_after:
    description:
      - Seconds a device a domain's intent declares may be absent before the agent records the event C(missing)
        (C(kvmhost-usb agent --missing-after)); once per absence.
    type: float
    default: 300
    version_added: 0.2.0
  events_backlog:
    description:
      - How many of the host's events C(/var/lib/kvmhost-usb) keeps for C(kvmhost-usb events) (the oldest go first;
        the numbers go on). Kept in C(/etc/kvmhost-usb/events.json).
    type: int
    default: 1000
    version_added: 0.2.0
  host_name:
    description:
      - The host's name in its events (their C(host)), kept in C(/etc/kvmhost-usb/events.json). Omitted, the host name
        the host gives itself.
    type: str
    version_added: 0.2.0
  python:
    description: The Python 3 interpreter the services run the program with (3.9 or later, with pyudev and libvirt-python).
    type: path
    default: /usr/bin/python3
  link:
    description:
      - The WireGuard link to the hosts this host shares devices with (service C(kvmhost-usb-link), interface
        C(kvmhost-usb)). Its key is made first on each host by M(kvmhost.usb.usb_link), whose public keys go in
        O(link.peers). The interface gets exactly these peers, each allowed its tunnel address alone; an nftables table
        (C(inet kvmhost_usb)) resets a connection to O(link.usbip_port) that does not come through the tunnel.
      - Omitted (or without peers), a link set up earlier is taken down, its table and settings removed (the key stays).
      - The settings, without any key, are kept in C(/etc/kvmhost-usb/link.json), for the service to set the link up
        again at boot.
    type: dict
    suboptions:
      address:
        description: This host's tunnel address with its prefix length (C(10.213.0.11/16)).
        type: str
        required: true
      mtu:
        description: The tunnel's MTU (M(kvmhost.usb.usb_link) returns the right one for the link).
        type: int
        default: 1420
      listen_port:
        description: The UDP port WireGuard listens on.
        type: int
        default: 51871
      usbip_port:
        description: The USB/IP port refused outside the tunnel.
        type: int
        default: 3240
      peers:
        description:
          - The peers, each with C(name) (inventory name), C(public_key), C(endpoint) (link address and port) and
            C(tunnel_address).
          - A peer whose C(public_key) is null (its host failed in this run, or is not in the play) keeps the key the
            tunnel has for it, or is left out with a warning when it has none.
        type: list
        elements: dict
        default: []
requirements:
  - systemd on the managed host.
notes:
  - The environment variable E(KVMHOST_USB_RUNTIME_ROOT) puts every file under another root directory; it exists for tests.
seealso:
  - module: kvmhost.usb.usb_passthrough
  - module: kvmhost.usb.usb_export
"""

EXAMPLES = r"""
- name: Install the host runtime with the agent and the exporter
  kvmhost.usb.usb_runtime:
    exporter: true

- name: A host that imports devices from kvm1
  kvmhost.usb.usb_runtime:
    import_addresses: [10.77.0.1]

- name: Remove the runtime
  kvmhost.usb.usb_runtime:
    state: absent
"""

RETURN = r"""
version:
  description: The collection version the program was built from.
  returned: success
  type: str
  sample: 0.2.0
hash:
  description: The build hash of the program (sha256 over its sources), as C(kvmhost-usb version) prints it.
  returned: success
  type: str
path:
  description: Where the program is.
  returned: success
  type: str
  sample: /usr/lib/kvmhost-usb/kvmhost-usb.pyz
changes:
  description: What the run changed (in check mode, would change), one line each.
  returned: success
  type: list
  elements: str
  sample: ["write the program", "write the agent unit", "restart kvmhost-usb-agent.service"]
services:
  description: Each service with whether it is wanted and what the run did to it (V(restart), V(start), V(stop) or V(none)).
  returned: success
  type: dict
  sample: {"agent": {"unit": "kvmhost-usb-agent.service", "wanted": true, "action": "none"}}
"""

import ipaddress
import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kvmhost.usb.plugins.module_utils import _link, _runtime, _runtime_install
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LinkError


PUBLIC_KEY = re.compile(r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$")


class RuntimeManager:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.root = os.environ.get("KVMHOST_USB_RUNTIME_ROOT", "")
        self.systemctl = module.get_bin_path("systemctl", required=True)
        self.changes = []
        self.diff = []

    def show(self, unit):
        rc, out, err = self.module.run_command([self.systemctl, "show", "--property=ActiveState,UnitFileState", unit])
        if rc != 0:
            self.module.fail_json(msg="systemctl show %s failed: %s" % (unit, err.strip() or out.strip()))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def systemctl_run(self, *args):
        rc, out, err = self.module.run_command([self.systemctl] + list(args))
        if rc != 0:
            self.module.fail_json(msg="systemctl %s failed: %s" % (" ".join(args), err.strip() or out.strip()), changes=self.changes)

    def check_params(self):
        params = self.params
        for address in params["import_addresses"]:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                self.module.fail_json(
                    msg="import_addresses: %r is not an IP address. The agent's unit admits TCP to the exporting hosts by address"
                    " (the passthrough role takes each from that host's usb_link_address, else its ansible_host)." % address
                )
        if not params["uri"] or any(character.isspace() for character in params["uri"]):
            self.module.fail_json(msg="uri: %r is not a libvirt URI (it must not be empty or hold white space)" % params["uri"])
        if not os.path.isabs(params["python"]) or any(character.isspace() for character in params["python"]):
            self.module.fail_json(msg="python: %r is not an absolute path without white space" % params["python"])
        if params["agent_period"] <= 0:
            self.module.fail_json(msg="agent_period: %s is not a positive number of seconds" % params["agent_period"])
        if params["agent_missing_after"] < 0:
            self.module.fail_json(msg="agent_missing_after: %s is not a number of seconds" % params["agent_missing_after"])
        if params["events_backlog"] < 1:
            self.module.fail_json(msg="events_backlog: %s is not a positive number of events" % params["events_backlog"])
        if params["host_name"] is not None and (not params["host_name"] or any(character.isspace() for character in params["host_name"])):
            self.module.fail_json(msg="host_name: %r is not a host name (it must not be empty or hold white space)" % params["host_name"])

    def link_settings(self):
        """The link's settings as link.json keeps them; None without a link. Fails on malformed ones."""
        link = self.params["link"]
        if self.params["state"] != "present" or not link or not link["peers"]:
            return None
        try:
            ipaddress.ip_interface(link["address"])
            if "/" not in link["address"]:
                raise ValueError("no prefix length")
        except ValueError as error:
            self.module.fail_json(msg="link.address: %r is not an address with its prefix length (%s)" % (link["address"], error))
        if not 576 <= link["mtu"] <= 65535:
            self.module.fail_json(msg="link.mtu: %s is not an MTU" % link["mtu"])
        for peer in link["peers"]:
            missing = [key for key in ("name", "endpoint", "tunnel_address") if not peer.get(key)]
            if missing:
                self.module.fail_json(msg="link.peers: %r lacks %s" % (peer, ", ".join(missing)))
            if peer.get("public_key") is None:
                continue
            if not PUBLIC_KEY.match(str(peer.get("public_key") or "")):
                self.module.fail_json(
                    msg="link.peers: the public_key of %s is %r, not a WireGuard public key (44 characters of base64)" % (peer["name"], peer.get("public_key"))
                )
            try:
                _link.check_address(str(peer["tunnel_address"]), "the tunnel_address of %s" % peer["name"])
                _link.check_address(str(peer["endpoint"]).rsplit(":", 1)[0].strip("[]"), "the endpoint of %s" % peer["name"])
            except LinkError as error:
                self.module.fail_json(msg="link.peers: %s" % error)
        return _link.settings(link["address"], link["mtu"], link["peers"], link["listen_port"], link["usbip_port"])

    def known_peers(self, settings, now):
        """The settings with each peer whose public key this run does not know (its host failed or is not in the play)
        keeping the key the tunnel (``now``, ``_link.current()``) has for it, or left out when the tunnel has none; None
        when no peer is left."""
        if self.module.check_mode or all(peer["public_key"] for peer in settings["peers"]):
            return settings
        held = dict((peer["tunnel_address"], peer["public_key"]) for peer in ((now or {}).get("peers") or []))
        kept = []
        for peer in settings["peers"]:
            if not peer["public_key"] and peer["tunnel_address"] in held:
                peer = dict(peer, public_key=held[peer["tunnel_address"]])
            if peer["public_key"]:
                kept.append(peer)
            else:
                self.module.warn(
                    "The link to %s is left out: its public key is unknown to this run and the tunnel has none (run the "
                    "converge on %s as well)" % (peer["name"], peer["name"])
                )
        return dict(settings, peers=kept) if kept else None

    def link_change(self):
        """``(settings, up, down)``: the link's settings with the peers' keys known (None without a link), whether the
        interface must be set up to hold them, or taken down. The interface is read once."""
        settings = self.link_settings()
        try:
            if settings is None:
                return None, False, _link.is_up()
            _link.check_tools()
            _link.check_kernel()
            now = _link.current()
            settings = self.known_peers(settings, now)
            if settings is None:
                return None, False, _link.is_up()
            return settings, _link.differs(settings, now, _link.public_key(self.root)), False
        except LinkError as error:
            self.module.fail_json(msg=str(error))

    def run(self):
        self.check_params()
        params = self.params
        present = params["state"] == "present"
        try:
            program = _runtime_install.build(params["python"])
        except _runtime_install.RuntimeBuildError as error:
            self.module.fail_json(msg=str(error))
        link, link_up, link_down = self.link_change()
        wanted = {"agent": present and params["agent"], "exporter": present and params["exporter"], "link": link is not None}
        files = _runtime_install.files(
            program, params["state"], params["agent"], params["exporter"], params["uri"], params["agent_period"],
            params["import_addresses"], params["python"], link, missing_after=params["agent_missing_after"],
            events=_runtime_install.events_settings(params["events_backlog"], params["host_name"]),
        )
        if link_up:
            self.changes.append("set up the link %s with %s" % (_link.INTERFACE, ", ".join(peer["name"] for peer in link["peers"])))
        if link_down:
            self.changes.append("take down the link %s" % _link.INTERFACE)
        current = dict((name, item.current(self.root)) for name, item in files.items())
        changed_files = [name for name, item in files.items() if current[name] != item.wanted()]
        for name in changed_files:
            item = files[name]
            self.changes.append(("write the %s" % name) if item.wanted() is not None else ("remove the %s" % name))
            if self.module._diff:
                is_program = name == "program"
                self.diff.append(dict(
                    before_header=item.path, after_header=item.path,
                    before=_runtime_install.describe(current[name], is_program),
                    after=_runtime_install.describe(item.wanted(), is_program),
                ))
        old_tree = _runtime_install.old_tree(self.root)
        if old_tree:
            self.changes.append("remove the agent's code of collection 0.1.0 (%s)" % _runtime_install.OLD_TREE)

        services = {}
        to_enable = []
        for role, unit in _runtime.SERVICES.items():
            installed = current["%s unit" % role] is not None
            state = self.show(unit) if installed else {}
            active = state.get("ActiveState") in ("active", "activating", "reloading")
            action = "none"
            if wanted[role]:
                if role == "link":
                    # Set up in place (link_up); the oneshot unit only runs when it has not, so the tunnel never flaps.
                    action = "start" if not active else "none"
                elif "program" in changed_files or "%s unit" % role in changed_files or not active:
                    action = "restart"
                if state.get("UnitFileState") != "enabled":
                    to_enable.append(unit)
                    self.changes.append("enable %s" % unit)
            elif installed:
                action = "stop"
            if action != "none":
                self.changes.append("%s %s" % (action, unit))
            services[role] = dict(unit=unit, wanted=wanted[role], action=action)

        if self.changes and not self.module.check_mode:
            self.apply(files, changed_files, services, to_enable, old_tree, link if link_up else None, link_down)
        result = dict(
            changed=bool(self.changes), version=program.version, hash=program.hash, path=_runtime_install.PROGRAM,
            changes=self.changes, services=services,
        )
        if self.module._diff:
            result["diff"] = self.diff
        self.module.exit_json(**result)

    def apply(self, files, changed_files, services, to_enable, old_tree, link_up, link_down):
        for item in services.values():
            if item["action"] == "stop":
                self.systemctl_run("disable", "--now", item["unit"])
        try:
            if link_down:
                _link.down()
            if link_up:
                _link.up(link_up, self.root)
        except LinkError as error:
            self.module.fail_json(msg=str(error), changes=self.changes)
        for name in changed_files:
            if files[name].wanted() is None:
                files[name].remove(self.root)
            else:
                files[name].write(self.root)
        if old_tree:
            shutil.rmtree(self.root + _runtime_install.OLD_TREE)
        if any(name.endswith(" unit") for name in changed_files):
            self.systemctl_run("daemon-reload")
        for item in services.values():
            if item["unit"] in to_enable:
                self.systemctl_run("enable", item["unit"])
            if item["action"] in ("restart", "start"):
                self.systemctl_run(item["action"], item["unit"])


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["present", "absent"], default="present"),
            agent=dict(type="bool", default=True),
            exporter=dict(type="bool", default=False),
            import_addresses=dict(type="list", elements="str", default=[]),
            uri=dict(type="str", default="qemu:///system"),
            agent_period=dict(type="float", default=60),
            agent_missing_after=dict(type="float", default=300),
            events_backlog=dict(type="int", default=1000),
            host_name=dict(type="str"),
            python=dict(type="path", default="/usr/bin/python3"),
            link=dict(
                type="dict",
                options=dict(
                    address=dict(type="str", required=True),
                    mtu=dict(type="int", default=1420),
                    listen_port=dict(type="int", default=_link.WIREGUARD_PORT),
                    usbip_port=dict(type="int", default=3240),
                    peers=dict(type="list", elements="dict", default=[]),
                ),
            ),
        ),
        supports_check_mode=True,
    )
    RuntimeManager(module).run()


if __name__ == "__main__":
    main()
