"""The host runtime's install (plugins/modules/usb_runtime.py) run as Ansible runs it (AnsiballZ, through `ansible`),
the program it writes, and `kvmhost-usb status` against the run's own libvirtd under umockdev.

This machine has no systemd as PID 1, so the module's systemctl is a stand-in that records its calls and answers
`show` from a file the test writes; the files go under KVMHOST_USB_RUNTIME_ROOT. The real systemd runs the program on
the test host (tests/integration/test_roles_testhost.py, test_agent_testhost.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import yaml

from tests.lib import usbtree
from tests.lib.domains import URI, defined_domains
from tests.lib.modrun import REPO, collection_root, run_module
from tests.lib.trees import KINGSTON, REFERENCE

PROGRAM = "/usr/lib/kvmhost-usb/kvmhost-usb.pyz"
AGENT_UNIT = "/etc/systemd/system/kvmhost-usb-agent.service"
EXPORTER_UNIT = "/etc/systemd/system/kvmhost-usb-exporter.service"
SYSTEMCTL = """#!/bin/sh
echo "$*" >> "$STANDIN_DIR/calls"
if [ "$1" = show ]; then cat "$STANDIN_DIR/state"; fi
"""


class Host:
    """A root directory for the runtime's files and a systemctl stand-in whose calls are read back."""

    def __init__(self, tmp_path):
        self.root = tmp_path / "root"
        self.root.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (self.bin / "systemctl").write_text(SYSTEMCTL)
        (self.bin / "systemctl").chmod(0o755)
        self.dir = tmp_path
        self.services("inactive", "disabled")

    def services(self, active, enabled):
        (self.dir / "state").write_text("ActiveState=%s\nUnitFileState=%s\n" % (active, enabled))

    def calls(self):
        path = self.dir / "calls"
        lines = path.read_text().splitlines() if path.exists() else []
        path.write_text("")
        return [line for line in lines if not line.startswith("show ")]

    def file(self, path):
        return self.root / path.lstrip("/")

    def snapshot(self):
        found = {}
        for directory, _subdirectories, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                found[os.path.relpath(path, self.root)] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
        return found

    def env(self):
        return dict(PATH="%s:%s" % (self.bin, os.environ["PATH"]), STANDIN_DIR=str(self.dir), KVMHOST_USB_RUNTIME_ROOT=str(self.root))

    def run(self, check=False, **args):
        """`ansible localhost -m kvmhost.usb.usb_runtime -a ARGS`: the module's result."""
        command = [os.path.join(os.path.dirname(sys.executable), "ansible"), "localhost", "-m", "kvmhost.usb.usb_runtime"]
        command += (["-a", json.dumps(args)] if args else []) + ["-o"]
        command += ["--check"] if check else []
        env = dict(
            os.environ,
            **self.env(),
            ANSIBLE_COLLECTIONS_PATH=collection_root(),
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
            ANSIBLE_LOCALHOST_WARNING="0",
            ANSIBLE_NOCOLOR="1",
        )
        process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False, cwd=str(self.dir))
        line = [line for line in process.stdout.splitlines() if line.startswith("localhost |")]
        assert line, process.stdout + process.stderr
        result = json.loads(line[0].split("=>", 1)[1])
        result["failed"] = " | FAILED" in line[0]
        return result


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


def run_program(host, *args, python="/usr/bin/python3", devices=None):
    command = [python, "-I", str(host.file(PROGRAM))] + list(args)
    if devices is not None:
        tree = host.dir / "tree.umockdev"
        tree.write_text(usbtree.render(devices))
        command = ["umockdev-run", "-d", str(tree), "--"] + command
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_one_task_installs_the_program_its_units_and_starts_the_services(host):
    result = host.run(exporter=True, import_addresses=["10.77.0.1"])
    assert not result["failed"] and result["changed"], result
    assert host.calls() == [
        "daemon-reload",
        "enable kvmhost-usb-agent.service",
        "restart kvmhost-usb-agent.service",
        "enable kvmhost-usb-exporter.service",
        "restart kvmhost-usb-exporter.service",
    ]
    program = host.file(PROGRAM)
    assert program.stat().st_mode & 0o777 == 0o755
    assert os.readlink(host.file("/usr/local/bin/kvmhost-usb")) == PROGRAM
    agent_unit = host.file(AGENT_UNIT).read_text()
    assert "ExecStart=/usr/bin/python3 %s agent --uri qemu:///system --period 60" % PROGRAM in agent_unit
    assert "IPAddressAllow=10.77.0.1" in agent_unit and "ExecStartPre=+/sbin/modprobe vhci-hcd" in agent_unit
    exporter_unit = host.file(EXPORTER_UNIT).read_text()
    assert "ExecStart=/usr/bin/python3 %s exporter serve" % PROGRAM in exporter_unit and "Type=notify" in exporter_unit
    assert host.file("/etc/modules-load.d/kvmhost-usb-importer.conf").read_text() == "vhci-hcd\n"
    assert host.file("/etc/modules-load.d/kvmhost-usb-exporter.conf").read_text() == "usbip-host\n"
    # The program runs on a plain Python without Ansible, and says which build it is.
    version = run_program(host, "version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.split() == ["kvmhost-usb", result["version"], result["hash"]]


def test_the_program_holds_every_module_it_imports_and_nothing_of_ansible(host):
    assert not host.run()["failed"]
    with zipfile.ZipFile(str(host.file(PROGRAM))) as archive:
        names = set(archive.namelist())
        sources = "".join(archive.read(name).decode() for name in names)
    prefix = "ansible_collections/kvmhost/usb/plugins/module_utils/"
    assert {prefix + "_runtime.py", prefix + "_agent.py", prefix + "_facts.py", prefix + "_host.py"} <= names
    assert not any(name.startswith("ansible_collections/kvmhost/usb/plugins/modules/") for name in names)
    assert "ansible.module_utils" not in sources
    # Every module the program can be asked to run imports from the zip alone (-I: no site packages, no PYTHONPATH).
    for command in (["agent", "--help"], ["exporter", "--help"], ["status", "--help"]):
        process = run_program(host, *command)
        assert process.returncode == 0, (command, process.stderr)


def test_a_second_run_changes_nothing_and_restarts_nothing(host):
    first = host.run(exporter=True)
    host.calls()
    host.services("active", "enabled")
    before = host.snapshot()
    second = host.run(exporter=True)
    assert not second["failed"] and not second["changed"], second
    assert second["hash"] == first["hash"]
    assert host.calls() == []
    assert host.snapshot() == before


def test_check_mode_changes_nothing_and_says_what_it_would_do(host):
    result = run_module("usb_runtime", {"exporter": True}, check_mode=True, diff=True, env=host.env())
    assert result["changed"]
    assert "write the program" in result["changes"] and "restart kvmhost-usb-exporter.service" in result["changes"]
    [exporter_unit] = [item for item in result["diff"] if item["after_header"] == EXPORTER_UNIT]
    assert exporter_unit["before"] == "" and "ExecStart=/usr/bin/python3 %s exporter serve" % PROGRAM in exporter_unit["after"]
    [program] = [item for item in result["diff"] if item["after_header"] == PROGRAM]
    assert program["after"].startswith("kvmhost-usb zipapp, ")
    assert host.snapshot() == {}
    assert host.calls() == []


def test_dropping_the_exporter_stops_and_removes_it_and_leaves_the_agent_running(host):
    host.run(exporter=True)
    host.calls()
    host.services("active", "enabled")
    result = host.run(exporter=False)
    assert result["changed"]
    assert result["services"]["exporter"]["action"] == "stop" and result["services"]["agent"]["action"] == "none"
    assert host.calls() == ["disable --now kvmhost-usb-exporter.service", "daemon-reload"]
    assert not host.file(EXPORTER_UNIT).exists()
    assert not host.file("/etc/modules-load.d/kvmhost-usb-exporter.conf").exists()
    assert host.file(AGENT_UNIT).exists()


def test_a_changed_unit_restarts_only_its_service(host):
    host.run(exporter=True)
    host.calls()
    host.services("active", "enabled")
    result = host.run(exporter=True, agent_period=30)
    assert result["changed"]
    assert host.calls() == ["daemon-reload", "restart kvmhost-usb-agent.service"]
    assert "--period 30" in host.file(AGENT_UNIT).read_text()


def test_state_absent_removes_everything_and_the_code_of_0_1_0(host):
    old = host.file("/usr/local/lib/kvmhost-usb/ansible_collections/kvmhost/usb/plugins/module_utils")
    old.mkdir(parents=True)
    (old / "_agent.py").write_text("# the agent as the role of 0.1.0 copied it\n")
    host.run(exporter=True)
    assert not host.file("/usr/local/lib/kvmhost-usb").exists()
    host.calls()
    host.services("active", "enabled")
    result = host.run(state="absent")
    assert result["changed"]
    assert host.calls() == ["disable --now kvmhost-usb-agent.service", "disable --now kvmhost-usb-exporter.service", "daemon-reload"]
    assert host.snapshot() == {}
    assert not host.run(state="absent")["changed"]


@pytest.mark.parametrize(
    "argument, message",
    [
        ({"import_addresses": ["10.77.0.1\nExecStartPre=/bin/sh"]}, "is not an IP address"),
        ({"uri": "qemu:///system --once"}, "is not a libvirt URI"),
        ({"python": "python3"}, "is not an absolute path"),
        ({"agent_period": 0}, "is not a positive number"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(host, argument, message):
    result = host.run(**argument)
    assert result["failed"] and message in result["msg"], result
    assert host.snapshot() == {}
    assert host.calls() == []


def test_status_says_what_the_host_holds_in_words_and_in_json(host):
    assert not host.run()["failed"]
    hostdev = "<hostdev mode='subsystem' type='usb'><source><vendor id='0x%s'/><product id='0x%s'/></source></hostdev>" % (
        KINGSTON["vendor_id"], KINGSTON["product_id"]
    )
    with defined_domains({"runtime-status": [hostdev]}):
        words = run_program(host, "status", "--uri", URI, python=sys.executable, devices=REFERENCE)
        shown = run_program(host, "status", "--uri", URI, "--json", python=sys.executable, devices=REFERENCE)
    assert words.returncode == 0 and shown.returncode == 0, words.stderr + shown.stderr
    report = json.loads(shown.stdout)
    kingston = "%s:%s" % (KINGSTON["vendor_id"], KINGSTON["product_id"])
    [attached] = report["attached"]
    assert attached["id"].startswith(kingston) and attached["domains"] == ["runtime-status"] and attached["live"] == []
    assert report["exports"] == [] and report["imports"] == []
    assert set(report["services"]) == {"agent", "exporter", "link"}
    assert report["version"] and len(report["hash"]) == 64
    assert "attached  %s at %s to runtime-status (persistent only)" % (attached["id"], KINGSTON["port"]) in words.stdout
    assert words.stdout.startswith("kvmhost-usb %s (build %s)" % (report["version"], report["hash"][:12]))


def test_the_version_the_runtime_reports_is_galaxy_ymls():
    with open(os.path.join(REPO, "galaxy.yml")) as handle:
        galaxy = yaml.safe_load(handle)
    source = open(os.path.join(REPO, "plugins", "module_utils", "_version.py")).read()
    assert 'COLLECTION_VERSION = "%s"' % galaxy["version"] in source


LINK = {
    "address": "10.213.50.11/16",
    "mtu": 1420,
    "peers": [{"name": "kvm2", "public_key": "A" * 43 + "=", "endpoint": "192.168.50.12:51871", "tunnel_address": "10.213.50.12"}],
}


@pytest.mark.parametrize(
    "link, message",
    [
        (dict(LINK, address="10.213.50.11"), "link.address: '10.213.50.11' is not an address with its prefix length"),
        (dict(LINK, peers=[dict(LINK["peers"][0], public_key="secret")]), "the public_key of kvm2 is 'secret', not a WireGuard public key"),
        (dict(LINK, peers=[dict(LINK["peers"][0], endpoint="kvm2:51871")]), "the endpoint of kvm2 'kvm2' is not an IP address"),
        (dict(LINK, mtu=100), "link.mtu: 100 is not an MTU"),
        # Well-formed: this machine's kernel has no wireguard module (the linked test hosts have it).
        (LINK, "the wireguard kernel module is missing"),
    ],
    ids=["no prefix", "bad key", "endpoint a name", "mtu", "no wireguard here"],
)
def test_a_link_that_cannot_be_fails_clearly_and_writes_nothing(host, link, message):
    result = host.run(exporter=True, link=link)
    assert result["failed"] and message in result["msg"], result
    assert host.snapshot() == {} and host.calls() == []


def test_the_events_settings_reach_the_agent_and_the_store(host):
    result = host.run(agent_missing_after=30, events_backlog=50, host_name="kvm1")
    assert not result["failed"] and result["changed"], result
    agent_unit = host.file(AGENT_UNIT).read_text()
    assert "ExecStart=/usr/bin/python3 %s agent --uri qemu:///system --period 60 --missing-after 30\n" % PROGRAM in agent_unit
    assert "StateDirectory=kvmhost-usb\n" in agent_unit and "CapabilityBoundingSet=\n" in agent_unit
    assert json.loads(host.file("/etc/kvmhost-usb/events.json").read_text()) == {"backlog": 50, "host": "kvm1"}
    # The defaults: 300 s, 1000 events, the host's own name.
    assert host.run()["changed"]
    assert "--missing-after 300\n" in host.file(AGENT_UNIT).read_text()
    assert json.loads(host.file("/etc/kvmhost-usb/events.json").read_text()) == {"backlog": 1000}
    assert host.run(events_backlog=0)["msg"] == "events_backlog: 0 is not a positive number of events"
