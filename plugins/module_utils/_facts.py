# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""What a host holds, read once: its USB devices with the domain each is attached to, what it exports to and imports
from other hosts, and its domains. usb_facts returns it; ``kvmhost-usb status`` prints it. Also where the domains are,
alone (``domain_states``): the passthrough role places the domains of ``usb_fleet`` with it."""

from __future__ import annotations

from ansible_collections.kvmhost.usb.plugins.module_utils import _crosshost, _host, _libvirt, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LibvirtError, UsbipError


def gather(uri: str, include_hubs: bool = False, filters: dict | None = None) -> dict:
    """``{devices, topology, domains, warnings}``; libvirt or the exports table out of reach is a warning, not an error:
    the devices are still reported."""
    warnings = []
    devices = _usb.enumerate_devices()
    model = _host.HostModel(devices, [])
    if _libvirt.libvirt is None:
        warnings.append("Not reporting attachments: %s is not installed" % _libvirt.LIBVIRT_REQUIREMENT)
    else:
        try:
            conn = _libvirt.connect(uri)
            try:
                model.domains = _host.load_domains(conn, uri)
            finally:
                conn.close()
        except (_libvirt.LibvirtError, _host.HostError, _libvirt.libvirt.libvirtError) as error:
            warnings.append("Not reporting attachments: %s" % error)

    listed = _usb.filter_devices(devices if include_hubs else model.candidates, filters or {})
    try:
        exported = _crosshost.exported_to(model.candidates)
    except UsbipError as error:
        warnings.append("Not reporting exports: %s" % error)
        exported = {}
    imported = _crosshost.imported_from(model.candidates)
    views = []
    for device in listed:
        view = model.device_view(device)
        view["exported_to"] = exported.get(device["id"])
        view["imported_from"] = imported.get(device["id"])
        views.append(view)
    return dict(
        devices=views,
        topology=_usb.build_topology(devices),
        domains=[model.domain_view(domain) for domain in model.domains],
        domain_states=[_domain_state(domain.name, domain.state, _host.PERSISTENT in domain.configs) for domain in model.domains],
        warnings=warnings,
    )


def domain_states(uri: str) -> list[dict]:
    """Each domain of the host as ``{name, state, persistent}``, from one listing of libvirt: no USB device and no
    domain XML is read. LibvirtError when libvirt cannot be reached."""
    libvirt = _libvirt.libvirt
    conn = _libvirt.connect(uri)
    try:
        states = []
        for handle in conn.listAllDomains(0):
            try:
                states.append(_domain_state(handle.name(), _libvirt.domain_state_name(handle), bool(handle.isPersistent())))
            except libvirt.libvirtError as error:
                # A domain undefined while we list it is simply not there.
                if error.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return states
    except libvirt.libvirtError as error:
        raise LibvirtError("Cannot list the domains at %s: %s" % (uri, _libvirt.error_message(error)))
    finally:
        conn.close()


def _domain_state(name: str, state: str, persistent: bool) -> dict:
    return {"name": name, "state": state, "persistent": persistent}
