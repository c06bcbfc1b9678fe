"""Cross-host passthrough on the consuming and the exporting host's own side, in the unit tier: selectors with
``host``, the action plugins resolving them from the inventory (a real ansible-playbook run under umockdev, against
the run's own libvirtd), the planner with a device imported over USB/IP, usb_facts' exported_to / imported_from, and
the exports the passthrough role computes from the whole inventory.

An imported device is described to umockdev as the kernel shows it: a USB device on the vhci bus and the vhci-hcd
platform device whose status lists the port it is imported at (tests.lib.usbtree.vhci_hcd); the import records are
in a directory of the test's own. The only USB/IP connections made here are to an exporter the test serves on
127.0.0.1 (tests/lib/usbip_exporter.py): a release gives the export back to it. Real imports, and two real hosts,
are in tests/integration/test_crosshost_testhost.py.
"""

from __future__ import annotations

import fcntl
import json
import re
import socket
import threading

import pytest
import yaml

from tests.lib import modrun
from tests.lib.domain_xml import hostdev, hostdevs, metadata
from tests.lib.domains import URI
from tests.lib.hostlock import wait_for_lock_waiter
from tests.lib.modrun import attach, detach, failed, run_module
from tests.lib.trees import KINGSTON_ID, REFERENCE
from tests.lib.usbip_exporter import STICK, fake_sysfs, serving
from tests.lib.usbtree import root_hub, vhci_hcd

from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import table  # noqa: E402  (usbip_exporter put it on the path)

STICK_ID = "46f4:0001:KING0001"
# The stick of kvm2 as kvm1 sees it once imported: a device on the vhci bus (3), at vhci port 0.
IMPORTED_STICK = {
    "port": "3-1",
    "vendor_id": "46f4",
    "product_id": "0001",
    "devnum": 2,
    "manufacturer": "QEMU",
    "product": "QEMU USB HARDDRIVE",
    "serial": "KING0001",
    "speed": "480",
    "device_class": "00",
    "interfaces": [("08", "usb-storage")],
}
IMPORTING = tuple(REFERENCE) + (root_hub(3), IMPORTED_STICK, vhci_hcd({0: "3-1"}))
# kvm2's exporter is served by the test on 127.0.0.1 (only loopback is used): a release gives the export back to it.
REMOTE = {"host": "kvm2", "link_address": "127.0.0.1", "id": STICK_ID}
RECORD = {"vhci_port": 0, "host": "kvm2", "link_address": "127.0.0.1", "busid": "2-1", "id": STICK_ID}


@pytest.fixture
def kvm2_exporter(tmp_path):
    """kvm2's exporter, exporting the stick (bus id 2-1) to this host (127.0.0.1): ``(exporter, port, lines)``."""
    fake_sysfs(tmp_path / "kvm2-sys", STICK)
    export = {"id": STICK_ID, "selector": {"id": STICK_ID}, "importer": "kvm1", "importer_address": "127.0.0.1", "domain": "buildvm"}
    directory = tmp_path / "kvm2"
    directory.mkdir()
    with serving(directory, [export], tmp_path / "kvm2-sys") as served:
        yield served


@pytest.fixture
def imports_dir(tmp_path, kvm2_exporter):
    """The import records of this test: the stick imported from kvm2's exporter at vhci port 0."""
    directory = tmp_path / "imports"
    directory.mkdir()
    (directory / "0.json").write_text(json.dumps(dict(RECORD, port=kvm2_exporter[1])))
    return directory


def env_of(imports_dir=None, exports=None):
    env = {}
    if imports_dir is not None:
        env["KVMHOST_USB_IMPORTS"] = str(imports_dir)
    if exports is not None:
        env["KVMHOST_USB_EXPORTS"] = str(exports)
    return env


# Selectors with host, through the module alone


@pytest.mark.parametrize(
    "selector, fragments",
    [
        ({"host": "kvm 2", "id": STICK_ID}, ["Malformed host 'kvm 2'", "inventory name"]),
        ({"host": "kvm2", "link_address": "10.77.0.2;reboot", "id": STICK_ID}, ["Malformed link_address"]),
        ({"link_address": "10.77.0.2", "id": STICK_ID}, ["has a link_address but no host"]),
        ({"host": "kvm2", "link_address": "10.77.0.2", "link_port": "70000", "id": STICK_ID}, ["Malformed link_port '70000'"]),
        ({"link_port": 3241, "id": STICK_ID}, ["has a link_port but no host"]),
        ({"host": "kvm2"}, ["Empty device selector"]),
        ({"host": "kvm2", "id": STICK_ID}, ["names host kvm2 but no link_address", "usb_link_address"]),
    ],
)
def test_malformed_remote_selector_fails_and_changes_nothing(domains, selector, fragments):
    name = domains.define("xhost-bad")
    before = domains.snapshot()
    failed(attach({"domain": name, "devices": [selector]}), *fragments)
    assert domains.snapshot() == before


def test_check_mode_reports_the_import_it_would_make_and_changes_nothing(domains):
    name = domains.define("xhost-check")
    before = domains.snapshot()
    result = attach({"domain": name, "devices": [REMOTE]}, check_mode=True)
    assert result["rc"] == 0, result
    assert result["changed"] is True
    assert result["actions"][0] == "would import id=%s from kvm2 (127.0.0.1)" % STICK_ID
    assert result["warnings"] == []
    assert domains.snapshot() == before


def test_imported_device_is_attached_and_recorded_with_its_host_then_detached_released_and_given_back(domains, imports_dir, kvm2_exporter):
    name = domains.define("xhost-attach")
    env = env_of(imports_dir)
    done = attach({"domain": name, "devices": [REMOTE]}, IMPORTING, env=env)
    assert done["rc"] == 0, done
    # The import stood already (the agent or an earlier run made it): nothing imported, the local device attached.
    assert not [action for action in done["actions"] if "import" in action]
    assert hostdevs(domains.inactive(name)) == [hostdev("46f4", "0001")]
    assert 'id="%s" serial="KING0001" port="3-1" address="003:002" host="kvm2" link_address="127.0.0.1">\n' % STICK_ID in metadata(domains.inactive(name))
    assert '<kvmhost-usb:selector id="%s" host="kvm2"/>' % STICK_ID in metadata(domains.inactive(name))
    again = attach({"domain": name, "devices": [REMOTE]}, IMPORTING, env=env)
    assert (again["rc"], again["changed"]) == (0, False), again

    gone = detach({"domain": name, "devices": [REMOTE]}, IMPORTING, env=env, check_mode=True)
    assert gone["actions"][-1] == "would release the import of %s from kvm2 (127.0.0.1)" % STICK_ID
    assert (imports_dir / "0.json").exists()
    exporter, _port, lines = kvm2_exporter
    assert len(table.read_exports(exporter.path)["exports"]) == 1
    gone = detach({"domain": name, "devices": [REMOTE]}, IMPORTING, env=env)
    assert gone["rc"] == 0, gone
    assert hostdevs(domains.inactive(name)) == []
    assert metadata(domains.inactive(name)) is None
    assert gone["actions"][-1] == "released the import of %s from kvm2 (127.0.0.1)" % STICK_ID
    assert gone["warnings"] == []
    assert not (imports_dir / "0.json").exists()
    # Taken back on this host, it is no longer exported on kvm2: the export is gone from kvm2's table at once.
    assert table.read_exports(exporter.path)["exports"] == []
    assert "2-1 (%s) given back by kvm1 (127.0.0.1), domain buildvm: export removed" % STICK_ID in lines


@pytest.fixture
def no_exporter():
    """127.0.0.1:3240 (the USB/IP port) bound by the test and not listening: a connection there is refused at once, as
    from a host whose exporter is down. Only loopback is used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", 3240))
        except OSError as error:
            pytest.fail("127.0.0.1:3240 is in use on this machine (%s); the test needs it unanswered" % error)
        yield "127.0.0.1"


def test_another_hosts_selector_never_takes_an_imported_device_and_an_unreachable_exporter_fails_naming_host_and_domain(domains, imports_dir, no_exporter):
    """A selector naming kvm3 is not satisfied by the stick imported from kvm2, even with the same id: it is imported
    from kvm3, whose exporter does not answer; the error names the host and the domain, and nothing changed."""
    name = domains.define("xhost-other")
    before = domains.snapshot()
    result = attach({"domain": name, "devices": [dict(REMOTE, host="kvm3", link_address=no_exporter)]}, IMPORTING, env=env_of(imports_dir))
    msg = failed(result, "Domain %s: cannot import id=%s from kvm3 (127.0.0.1): " % (name, STICK_ID))
    assert "connection refused" in msg, msg
    assert domains.snapshot() == before
    assert (imports_dir / "0.json").exists()


def test_an_import_waits_for_the_host_lock_as_the_agents_imports_do(domains, imports_dir, tmp_path):
    """Two imports at once on one host would pick the same free vhci port: a run imports only under the host lock.
    The exporter here is a listener of the test's that closes every connection, so the import fails once made."""
    name = domains.define("xhost-lock")
    lock = tmp_path / "lock"
    lock.touch()
    env = dict(env_of(imports_dir), KVMHOST_USB_LOCK=str(lock))
    connections = []
    results = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        selector = dict(REMOTE, host="kvm3", link_port=listener.getsockname()[1])

        def answer():
            connection, _address = listener.accept()
            connections.append(connection)
            connection.close()

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        run = threading.Thread(target=lambda: results.append(attach({"domain": name, "devices": [selector]}, IMPORTING, env=env)))
        with open(lock) as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            run.start()
            wait_for_lock_waiter(lock, run, results)
            assert connections == []
        run.join()
        answering.join(timeout=10)
    assert len(connections) == 1
    failed(results[0], "Domain %s: cannot import id=%s from kvm3 (127.0.0.1:%d)" % (name, STICK_ID, selector["link_port"]), "closed the connection")


def test_converge_drops_an_imported_device_no_longer_declared_and_releases_its_import(domains, imports_dir):
    name = domains.define("xhost-drop")
    env = env_of(imports_dir)
    declared = {name: {"devices": [REMOTE]}}
    assert run_module("usb_passthrough", {"domains": declared}, IMPORTING, env=env)["rc"] == 0
    assert hostdevs(domains.inactive(name)) == [hostdev("46f4", "0001")]
    again = run_module("usb_passthrough", {"domains": declared}, IMPORTING, env=env)
    assert (again["rc"], again["changed"]) == (0, False), again
    dropped = run_module("usb_passthrough", {"domains": {name: {"devices": []}}}, IMPORTING, env=env)
    assert dropped["rc"] == 0, dropped
    assert hostdevs(domains.inactive(name)) == []
    assert dropped["actions"][-1] == "released the import of %s from kvm2 (127.0.0.1)" % STICK_ID
    assert not (imports_dir / "0.json").exists()


# usb_facts


def test_facts_show_the_exported_and_the_imported_devices(tmp_path, imports_dir):
    exports = tmp_path / "exports.json"
    exports.write_text(
        json.dumps(
            {
                "listen": "10.77.0.1",
                "port": 3240,
                "exports": [{"id": KINGSTON_ID, "selector": {"id": KINGSTON_ID}, "importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm"}],
            }
        )
    )
    result = run_module("usb_facts", {"host_conf": "/nonexistent"}, IMPORTING, env=env_of(imports_dir, exports))
    assert result["rc"] == 0, result
    devices = dict((device["id"], device) for device in result["ansible_facts"]["usb_devices"])
    assert devices[KINGSTON_ID]["exported_to"] == {"host": "kvm2", "domain": "buildvm", "address": "10.77.0.2"}
    assert devices[KINGSTON_ID]["imported_from"] is None
    assert devices[STICK_ID]["imported_from"] == {"host": "kvm2", "link_address": "127.0.0.1", "busid": "2-1"}
    assert devices[STICK_ID]["exported_to"] is None
    assert devices["0627:0001:42"]["exported_to"] is None


# The action plugins and the role, through ansible-playbook


def run_playbook(tmp_path, hosts, tasks, *options, devices=tuple(REFERENCE), env=None, play_hosts="kvm1", roles=()):
    """A playbook of ``tasks`` (or ``roles``) on ``play_hosts`` of an inventory of ``hosts`` (name to host vars; every
    host connects locally), run under umockdev with ``devices``."""
    play = {"name": "cross-host", "hosts": play_hosts, "gather_facts": False}
    if roles:
        play["roles"] = list(roles)
    else:
        play["tasks"] = tasks
    playbook = tmp_path / "play.yml"
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    return modrun.run_playbook(tmp_path, hosts, playbook, *options, devices=devices, env=env)


def registered(name):
    return {"ansible.builtin.debug": {"var": name}}


def shown_var(process, name):
    """The value a debug var task printed for ``name`` on kvm1."""
    body = process.stdout.split("ok: [kvm1] => ", 1)[1].split("\n\n", 1)[0]
    return yaml.safe_load(body)[name]


# This machine's kernel has no WireGuard: the unit tier's fleets use plain USB/IP (usb_link_encryption none); the
# tunnel is on the linked test hosts (tests/integration/test_crosshost_testhost.py).
CLEAR = {"usb_link_encryption": "none"}
FLEET = {
    "kvm1": dict(CLEAR),
    "kvm2": dict(CLEAR, usb_link_address="10.77.0.2", ansible_host="192.0.2.2"),
    "kvm3": dict(CLEAR, ansible_host="127.0.0.3"),
    "kvm4": dict(CLEAR),
    "kvm5": dict(CLEAR, usb_link_address="10.77.0.5", usb_link_port=3241),
    "kvm6": {"usb_link_address": "10.77.0.6"},
}


@pytest.mark.parametrize(
    "host, address",
    [("kvm2", "10.77.0.2"), ("kvm3", "127.0.0.3"), ("kvm4", "kvm4"), ("kvm5", "10.77.0.5:3241"), ("kvm6", "10.213.0.6")],
    ids=["link address", "ansible_host", "inventory name", "link port", "tunnel address"],
)
def test_action_plugin_fills_link_address_from_the_inventory(tmp_path, domains, host, address):
    name = domains.define("xhost-inv")
    before = domains.snapshot()
    task = {"kvmhost.usb.usb_attach": {"domain": name, "devices": [{"host": host, "id": STICK_ID}], "uri": URI}, "register": "result"}
    process = run_playbook(tmp_path, FLEET, [task, registered("result.actions")], "--check")
    assert process.returncode == 0, process.stdout + process.stderr
    assert shown_var(process, "result.actions")[0] == "would import id=%s from %s (%s)" % (STICK_ID, host, address)
    assert domains.snapshot() == before


def test_action_plugin_makes_a_selector_naming_the_managed_host_local(tmp_path, domains):
    name = domains.define("xhost-self")
    task = {"kvmhost.usb.usb_attach": {"domain": name, "devices": [{"host": "kvm1", "id": KINGSTON_ID}], "uri": URI}}
    process = run_playbook(tmp_path, FLEET, [task])
    assert process.returncode == 0, process.stdout + process.stderr
    assert hostdevs(domains.inactive(name)) == [hostdev("0951", "1666")]
    assert 'host="' not in metadata(domains.inactive(name))


def test_action_plugin_fails_for_a_host_not_in_the_inventory(tmp_path, domains):
    name = domains.define("xhost-unknown")
    before = domains.snapshot()
    task = {"kvmhost.usb.usb_passthrough": {"domains": {name: {"devices": [{"host": "kvm9", "id": STICK_ID}]}}, "uri": URI}}
    process = run_playbook(tmp_path, FLEET, [task])
    assert process.returncode != 0
    assert "Domain %s: host kvm9 is not in the inventory" % name in process.stdout, process.stdout
    assert domains.snapshot() == before


def test_exports_are_computed_from_every_host_of_the_inventory(tmp_path):
    hosts = {
        "kvm1": dict(CLEAR, usb_link_address="10.77.0.1"),
        "kvm2": dict(CLEAR, usb_link_address="10.77.0.2", usb_passthrough={"buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}, "0627:0001"]}}),
        "kvm3": dict(CLEAR, ansible_host="127.0.0.3", usb_passthrough={"testvm": {"devices": [{"host": "kvm1", "vendor_id": "0627", "product_id": "0001"}]}}),
        "kvm4": dict(CLEAR, usb_passthrough={"other": {"devices": [{"host": "kvm2", "id": STICK_ID}]}}),
    }
    task = {"ansible.builtin.set_fact": {"exported": "{{ hostvars | kvmhost.usb.usb_exports(inventory_hostname, groups['all']) }}"}}
    process = run_playbook(tmp_path, hosts, [task, registered("exported")])
    assert process.returncode == 0, process.stdout + process.stderr
    assert shown_var(process, "exported") == {
        "declaration": {},
        "unplaced": [],
        "exports": [
            {"id": KINGSTON_ID, "importer": "kvm2", "importer_address": "10.77.0.2", "domain": "buildvm"},
            {"vendor_id": "0627", "product_id": "0001", "importer": "kvm3", "importer_address": "127.0.0.3", "domain": "testvm"},
        ],
        "conflicts": [],
        "link_address": "10.77.0.1",
        "listen_address": "10.77.0.1",
        "import_addresses": [],
        "encryption": "none",
        "peers": [
            {"name": "kvm2", "link_address": "10.77.0.2", "tunnel_address": None, "endpoint": None},
            {"name": "kvm3", "link_address": "127.0.0.3", "tunnel_address": None, "endpoint": None},
        ],
        "link": None,
        "clear_links": [
            "%s and %s share USB devices in clear text (usb_link_encryption none)" % pair for pair in (("kvm1", "kvm2"), ("kvm1", "kvm3"), ("kvm2", "kvm4"))
        ],
    }


def test_role_refuses_a_device_declared_here_and_exported_naming_both(tmp_path, domains):
    name = domains.define("xhost-twice")
    before = domains.snapshot()
    hosts = {
        "kvm1": {"usb_passthrough": {name: {"devices": [KINGSTON_ID]}}},
        "kvm2": {"usb_link_address": "10.77.0.2", "usb_passthrough": {"buildvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}},
        "kvm3": {"usb_passthrough": {"testvm": {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}},
    }
    process = run_playbook(tmp_path, hosts, None, "--check", roles=["kvmhost.usb.passthrough"], play_hosts="all")
    assert process.returncode != 0
    # Every host refuses, the importers too: nothing changes anywhere.
    assert sorted(re.findall(r"^fatal: \[(\w+)\]", process.stdout, re.M)) == ["kvm1", "kvm2", "kvm3"], process.stdout + process.stderr
    assert (
        "Device (id=%s) on kvm1 is declared for buildvm on kvm2 and for testvm on kvm3; one device goes to one VM." % KINGSTON_ID in process.stdout
    ), process.stdout
    assert "Device (id=%s) on kvm1 is declared for its domain %s and exported to kvm2 for buildvm" % (KINGSTON_ID, name) in process.stdout
    assert domains.snapshot() == before


def test_role_refuses_a_host_not_in_the_inventory_before_anything_changes(tmp_path, domains):
    name = domains.define("xhost-unknown")
    before = domains.snapshot()
    hosts = {
        "kvm1": {"usb_link_address": "10.77.0.1"},
        "kvm2": {"usb_link_address": "10.77.0.2", "usb_passthrough": {name: {"devices": [{"host": "kvm9", "id": KINGSTON_ID}]}}},
    }
    process = run_playbook(tmp_path, hosts, None, roles=["kvmhost.usb.passthrough"], play_hosts="all")
    assert process.returncode != 0
    assert sorted(re.findall(r"^fatal: \[(\w+)\]", process.stdout, re.M)) == ["kvm1", "kvm2"], process.stdout + process.stderr
    assert "usb_passthrough.%s of kvm2: host kvm9 is not in the inventory." % name in process.stdout
    assert "TASK [kvmhost.usb.passthrough : Install or remove the host runtime (kvmhost-usb)]" not in process.stdout
    assert domains.snapshot() == before


def reported(process, host):
    """What the passthrough role's "Report what changed" printed for ``host``."""
    block = process.stdout.split("TASK [kvmhost.usb.passthrough : Report what changed]", 1)[1]
    body = block.split("ok: [%s] => " % host, 1)[1].split("\n}\n", 1)[0] + "\n}"
    return yaml.safe_load(body)["msg"]


def test_role_in_check_mode_reports_the_export_and_the_import_and_changes_nothing(tmp_path, domains):
    name = domains.define("xhost-role")
    before = domains.snapshot()
    hosts = {
        "kvm1": dict(CLEAR, usb_link_address="10.77.0.1"),
        "kvm2": dict(CLEAR, usb_link_address="10.77.0.2", usb_passthrough={name: {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}),
    }
    exports = tmp_path / "exports.json"
    process = run_playbook(tmp_path, hosts, None, "--check", roles=["kvmhost.usb.passthrough"], play_hosts="all", env={"KVMHOST_USB_EXPORTS": str(exports)})
    assert process.returncode == 0, process.stdout + process.stderr
    assert reported(process, "kvm2") == {
        name: ["would import id=%s from kvm1 (10.77.0.1)" % KINGSTON_ID, "record the intent of %s (persistent): %s" % (name, KINGSTON_ID)]
    }
    assert reported(process, "kvm1") == {"exports to other hosts": ["export %s to kvm2 (10.77.0.2) for %s" % (KINGSTON_ID, name)]}
    assert not exports.exists()
    assert domains.snapshot() == before
    # Plain USB/IP is warned about once in the run, not once a host.
    assert process.stdout.count("WARNING: kvm1 and kvm2 share USB devices in clear text (usb_link_encryption none).") == 1, process.stdout


def test_role_with_encryption_fails_clearly_on_a_host_that_cannot_make_the_link_and_changes_nothing(tmp_path, domains):
    # This machine is the unit tier's "host": its kernel has no wireguard module (the linked test hosts have).
    name = domains.define("xhost-nowg")
    before = domains.snapshot()
    hosts = {
        "kvm1": {"usb_link_address": "127.0.0.1"},
        "kvm2": {"usb_link_address": "192.0.2.12", "usb_passthrough": {name: {"devices": [{"host": "kvm1", "id": KINGSTON_ID}]}}},
    }
    exports = tmp_path / "exports.json"
    process = run_playbook(tmp_path, hosts, None, roles=["kvmhost.usb.passthrough"], play_hosts="all", env={"KVMHOST_USB_EXPORTS": str(exports)})
    assert process.returncode != 0
    fatal = 'fatal: [kvm1]: FAILED! => {"changed": false, "msg": "the wireguard kernel module is missing: boot a kernel with WireGuard'
    assert fatal in process.stdout, process.stdout
    assert "usb_link_address 192.0.2.12 is not an address of this host (it has " in process.stdout, process.stdout
    assert "TASK [kvmhost.usb.passthrough : Export the declared devices" not in process.stdout
    assert not exports.exists()
    assert domains.snapshot() == before
