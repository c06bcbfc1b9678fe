"""The action plugins' side of selectors with ``host`` (plugins/plugin_utils/_inventory_hosts.py): the inventory name
resolved to where the managed host reaches that host, and the usb_exports filter's own check of a declaration."""

from __future__ import annotations

import sys

import pytest

from tests.lib.modrun import collection_root

sys.path.insert(0, collection_root())

from ansible.errors import AnsibleActionFail, AnsibleFilterError  # noqa: E402

from ansible_collections.kvmhost.usb.plugins.filter.usb_exports import usb_exports  # noqa: E402
from ansible_collections.kvmhost.usb.plugins.plugin_utils._inventory_hosts import resolve_selector  # noqa: E402

HOSTVARS = {
    "kvm1": {"usb_link_address": "10.77.0.1", "usb_link_port": 3241},
    "kvm2": {"ansible_host": "192.0.2.2"},
    "kvm3": {},
}


def test_another_host_is_reached_at_its_link_address_else_its_ansible_host_else_its_name():
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


def test_a_host_not_in_the_inventory_fails_naming_it():
    with pytest.raises(AnsibleActionFail, match="Domain vm: host kvm9 is not in the inventory"):
        resolve_selector({"host": "kvm9", "id": "46f4:0001:KING0001"}, HOSTVARS, "kvm1", "Domain vm")


def test_usb_exports_gives_the_link_addresses_and_checks_each_declaration_as_the_modules_do():
    hostvars = dict(HOSTVARS, kvm2={"ansible_host": "192.0.2.2", "usb_passthrough": {"vm": {"devices": [{"host": "kvm1", "id": "46f4:0001:KING0001"}]}}})
    exported = usb_exports(hostvars, "kvm2", ["kvm1", "kvm2", "kvm3"])
    assert exported["link_address"] == "192.0.2.2"
    assert exported["import_addresses"] == ["10.77.0.1"]
    assert usb_exports(hostvars, "kvm1", ["kvm1", "kvm2", "kvm3"])["exports"] == [
        {"id": "46f4:0001:KING0001", "importer": "kvm2", "importer_address": "192.0.2.2", "domain": "vm"}
    ]
    broken = dict(HOSTVARS, kvm3={"usb_passthrough": {"vm": {"devices": [], "exclusiv": True}}})
    with pytest.raises(AnsibleFilterError, match=r"usb_passthrough of kvm3: Domain vm: unknown setting\(s\) exclusiv"):
        usb_exports(broken, "kvm1", ["kvm1", "kvm2", "kvm3"])
