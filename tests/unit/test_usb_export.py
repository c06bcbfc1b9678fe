"""usb_export: the whole list of a host's USB/IP exports, checked against the host model (real pyudev under umockdev,
the run's own libvirtd) and written to an exports table of the test's own (E(KVMHOST_USB_EXPORTS))."""

from __future__ import annotations

import json

import pytest

from tests.lib.modrun import attach, failed, run_module
from tests.lib.trees import KINGSTON_ID, TWINS

TABLET = "0627:0001:42"
EXPORT = {"id": KINGSTON_ID, "importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm"}


@pytest.fixture
def table(tmp_path):
    return tmp_path / "etc" / "exports.json"


def export(table, exports, devices=TWINS, local_domains=None, **options):
    args = {"exports": exports, "listen_address": "10.77.0.1"}
    if local_domains is not None:
        args["local_domains"] = local_domains
    return run_module("usb_export", args, devices, env={"KVMHOST_USB_EXPORTS": str(table)}, **options)


def test_the_table_is_written_once_and_a_rerun_changes_nothing(table):
    result = export(table, [EXPORT])
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert [(item["id"], item["busid"], item["importer_address"]) for item in result["exports"]] == [(KINGSTON_ID, "2-1", "10.77.0.2")]
    written = json.loads(table.read_text())
    assert written == {
        "listen": "10.77.0.1",
        "port": 3240,
        "exports": [{"id": KINGSTON_ID, "selector": {"id": KINGSTON_ID}, "importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm"}],
    }
    again = export(table, [EXPORT])
    assert again["rc"] == 0 and again["changed"] is False, again
    emptied = export(table, [])
    assert emptied["changed"] is True
    assert json.loads(table.read_text())["exports"] == []


def test_nothing_to_export_and_no_table_writes_nothing(table):
    result = export(table, [])
    assert result["rc"] == 0 and result["changed"] is False, result
    assert not table.exists()
    # Once a table was written, emptying it is a change (the exporter then gives the devices back).
    assert export(table, [EXPORT])["changed"] is True
    assert export(table, [])["changed"] is True and json.loads(table.read_text())["exports"] == []


def test_check_mode_writes_nothing_and_the_diff_shows_the_table(table):
    result = export(table, [dict(EXPORT, id=None, vendor_id="0951", product_id="1666")], check_mode=True, diff=True)
    assert result["rc"] == 0 and result["changed"] is True, result
    assert not table.exists()
    assert '"importer_address": "10.77.0.2"' in result["diff"]["after"]
    assert result["diff"]["before"].count('"exports": []') == 1


def test_an_absent_device_is_refused_and_nothing_is_written(table):
    failed(
        export(table, [dict(EXPORT, id="abcd:0001:NOPE")]),
        "Export of (id=abcd:0001:NOPE) for domain buildvm on kvm2: No USB device matches",
    )
    assert not table.exists()


def test_a_device_a_local_domain_holds_is_refused_naming_it(table, domains):
    name = domains.define("holder")
    assert attach({"domain": name, "devices": [KINGSTON_ID]}, TWINS)["rc"] == 0
    failed(export(table, [EXPORT]), "%s is held by local domain %s (persistent) on this host" % (KINGSTON_ID, name))
    assert not table.exists()


def test_a_device_declared_for_a_local_domain_is_refused(table):
    declared = {"localvm": {"devices": ["0951:1666"]}, "other": {"devices": [{"host": "kvm3", "id": TABLET}]}}
    failed(export(table, [EXPORT], local_domains=declared), "%s is also declared for local domain localvm on this host" % KINGSTON_ID)
    assert not table.exists()
    # The selector with host is a device this host imports, not one of its own: the tablet may be exported.
    tablet = dict(EXPORT, id=TABLET)
    assert export(table, [tablet], local_domains=declared)["rc"] == 0


def test_one_device_for_two_importers_is_refused_naming_both(table):
    failed(
        export(table, [EXPORT, dict(EXPORT, id=None, port="2-1", importer="kvm3", importer_address="10.77.0.3", domain="testvm")]),
        "%s is declared for two domains: buildvm on kvm2 and testvm on kvm3" % KINGSTON_ID,
    )
    assert not table.exists()


@pytest.mark.parametrize(
    "item, fragment",
    [
        ({"id": KINGSTON_ID, "importer": "kvm2", "domain": "buildvm"}, "lacks importer_address"),
        (dict(EXPORT, colour="red"), "unknown field(s) colour"),
        (dict(EXPORT, id="0951"), "Malformed id '0951'"),
        ({"importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm"}, "Empty device selector"),
    ],
)
def test_a_malformed_export_is_refused(table, item, fragment):
    failed(export(table, [item]), fragment)
    assert not table.exists()
