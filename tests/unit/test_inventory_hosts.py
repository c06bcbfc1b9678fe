"""The action plugins' side of selectors with ``host`` (plugins/plugin_utils/_inventory_hosts.py): the inventory name
resolved to where the managed host reaches that host, and the usb_exports filter's own check of a declaration."""

from __future__ import annotations

import re
import sys

import pytest

from tests.lib.modrun import collection_root

sys.path.insert(0, collection_root())

from ansible.errors import AnsibleActionFail, AnsibleFilterError  # noqa: E402

from ansible_collections.kvmhost.usb.plugins.filter.usb_exports import usb_exports  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import resolve_selector  # noqa: E402

CLEAR = {"usb_link_encryption": "none"}
HOSTVARS = {
    "kvm1": dict(CLEAR, usb_link_address="10.77.0.1", usb_link_port=3241),
    "kvm2": dict(CLEAR, ansible_host="192.0.2.2"),
    "kvm3": dict(CLEAR),
}


def test_without_encryption_another_host_is_reached_at_its_link_address_else_its_ansible_host_else_its_name():
    assert resolve_selector({"host": "kvm1", "id": "46f4:0001:KING0001"}, HOSTVARS, "kvm2", "Domain vm") == {
        "host": "kvm1",
        "id": "46f4:0001:KING0001",
        "link_address": "10.77.0.1",
        "link_port": 3241,
    }
    assert resolve_selector({"host": "kvm2", "id": "46f4:0001:KING0001"}, HOSTVARS, "kvm1", "Domain vm")["link_address"] == "192.0.2.2"
    assert resolve_selector({"host": "kvm3", "id": "46f4:0001:KING0001"}, HOSTVARS, "kvm1", "Domain vm")["link_address"] == "kvm3"


def test_the_managed_host_itself_is_a_local_selector():
    selector = {"host": "kvm1", "id": "46f4:0001:KING0001", "link_address": "10.77.0.1", "link_port": "3241"}
    assert resolve_selector(selector, HOSTVARS, "kvm1", "Domain vm") == {"id": "46f4:0001:KING0001"}


def test_with_encryption_another_host_is_reached_at_its_tunnel_address_derived_from_its_link_address_or_set():
    hostvars = {
        "kvm1": {"usb_link_address": "192.168.50.11"},
        "kvm2": {"usb_link_address": "192.168.50.12", "usb_link_tunnel_address": "10.99.0.7"},
        "kvm3": {"usb_link_address": "192.168.50.13", "usb_link_tunnel_network": "10.50.0.0/24"},
        "kvm4": {"ansible_host": "kvm4.example.org"},
    }
    resolved = dict(
        (host, resolve_selector({"host": host, "id": "46f4:0001:KING0001"}, hostvars, "kvm9", "Domain vm")["link_address"]) for host in ("kvm1", "kvm2", "kvm3")
    )
    assert resolved == {"kvm1": "10.213.50.11", "kvm2": "10.99.0.7", "kvm3": "10.50.0.13"}
    underivable = r"Domain vm: kvm4: Cannot derive a tunnel address: link address 'kvm4.example.org' is not an IP address; set usb_link_address"
    with pytest.raises(AnsibleActionFail, match=underivable):
        resolve_selector({"host": "kvm4", "id": "46f4:0001:KING0001"}, hostvars, "kvm9", "Domain vm")


def test_a_host_not_in_the_inventory_fails_naming_it():
    with pytest.raises(AnsibleActionFail, match="Domain vm: host kvm9 is not in the inventory"):
        resolve_selector({"host": "kvm9", "id": "46f4:0001:KING0001"}, HOSTVARS, "kvm1", "Domain vm")


def test_usb_exports_gives_the_link_addresses_and_checks_each_declaration_as_the_modules_do():
    declared = {"vm": {"devices": [{"host": "kvm1", "id": "46f4:0001:KING0001"}]}}
    hostvars = dict(HOSTVARS, kvm2=dict(CLEAR, ansible_host="192.0.2.2", usb_passthrough=declared))
    exported = usb_exports(hostvars, "kvm2", ["kvm1", "kvm2", "kvm3"])
    assert exported["link_address"] == "192.0.2.2"
    assert exported["import_addresses"] == ["10.77.0.1"]
    assert usb_exports(hostvars, "kvm1", ["kvm1", "kvm2", "kvm3"])["exports"] == [
        {"id": "46f4:0001:KING0001", "importer": "kvm2", "importer_address": "192.0.2.2", "domain": "vm"}
    ]
    broken = dict(HOSTVARS, kvm3={"usb_passthrough": {"vm": {"devices": [], "exclusiv": True}}})
    with pytest.raises(AnsibleFilterError, match=r"usb_passthrough of kvm3: Domain vm: unknown setting\(s\) exclusiv"):
        usb_exports(broken, "kvm1", ["kvm1", "kvm2", "kvm3"])


def pair(**vars_of):
    """kvm1 exports the stick to kvm2's vm: each host's vars updated with ``vars_of[host]``."""
    hostvars = {
        "kvm1": {"usb_link_address": "192.168.50.11"},
        "kvm2": {"usb_link_address": "192.168.50.12", "usb_passthrough": {"vm": {"devices": [{"host": "kvm1", "id": "46f4:0001:KING0001"}]}}},
        "kvm3": {"usb_link_address": "192.168.50.13"},
    }
    for host, extra in vars_of.items():
        hostvars[host].update(extra)
    return hostvars


def test_usb_exports_gives_each_linked_host_its_wireguard_link_and_peers():
    hosts = ["kvm1", "kvm2", "kvm3"]
    exporter = usb_exports(pair(), "kvm1", hosts)
    importer = usb_exports(pair(), "kvm2", hosts)
    assert exporter["conflicts"] == [] and exporter["clear_links"] == []
    assert (exporter["encryption"], exporter["listen_address"]) == ("wireguard", "10.213.50.11")
    assert exporter["exports"][0]["importer_address"] == "10.213.50.12"
    assert importer["import_addresses"] == ["10.213.50.11"]
    assert exporter["link"] == {
        "address": "10.213.50.11/16",
        "listen_port": 51871,
        "usbip_port": 3240,
        "peers": [{"name": "kvm2", "endpoint": "192.168.50.12:51871", "tunnel_address": "10.213.50.12"}],
    }
    assert [peer["name"] for peer in importer["link"]["peers"]] == ["kvm1"]
    # kvm3 shares nothing: no link, no peer.
    assert usb_exports(pair(), "kvm3", hosts)["link"] is None


@pytest.mark.parametrize(
    "vars_of, conflict",
    [
        ({"kvm2": CLEAR}, r"Hosts kvm1 \(usb_link_encryption wireguard\) and kvm2 \(usb_link_encryption none\) share USB devices over one link"),
        ({"kvm2": {"usb_link_address": "192.168.50.11"}}, r"Hosts kvm1 and kvm2 have the same link address 192.168.50.11"),
        ({"kvm2": {"usb_link_tunnel_address": "10.213.50.11"}}, r"Hosts kvm1 and kvm2 have the same tunnel address 10.213.50.11"),
        ({"kvm1": {"usb_link_address": "10.1.0.0"}}, r"kvm1: Cannot derive a tunnel address from link address 10.1.0.0"),
        ({"kvm1": {"usb_link_encryption": "tls"}}, r"usb_link_encryption of kvm1 is 'tls'; it is wireguard or none"),
    ],
    ids=["mixed encryption", "same link address", "same tunnel address", "underivable", "unknown encryption"],
)
def test_usb_exports_names_both_hosts_of_a_link_that_cannot_be(vars_of, conflict):
    # Every host of the fleet sees the conflicts, so that the role stops them all before anything changes.
    seen = [usb_exports(pair(**vars_of), host, ["kvm1", "kvm2", "kvm3"])["conflicts"] for host in ("kvm1", "kvm2", "kvm3")]
    assert seen[0] == seen[1] == seen[2]
    assert [sentence for sentence in seen[0] if re.search(conflict, sentence)], seen[0]


def test_usb_exports_says_which_links_are_clear_text():
    clear = usb_exports(pair(kvm1=CLEAR, kvm2=CLEAR), "kvm3", ["kvm1", "kvm2", "kvm3"])
    assert clear["clear_links"] == ["kvm1 and kvm2 share USB devices in clear text (usb_link_encryption none)"]
    exporter = usb_exports(pair(kvm1=CLEAR, kvm2=CLEAR), "kvm1", ["kvm1", "kvm2", "kvm3"])
    assert (exporter["link"], exporter["listen_address"], exporter["exports"][0]["importer_address"]) == (None, "192.168.50.11", "192.168.50.12")
