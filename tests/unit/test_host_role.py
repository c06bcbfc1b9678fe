"""The kvmhost.usb.host role run by playbooks/enable_host.yml against this machine (connection local),
with host.conf files in a temporary directory.

The kubectl and rollout strategies cannot meet a real Kubernetes cluster here: they are tested against a
stand-in kubectl on PATH (tests/lib/kubectl_standin.py) that plays the daemonset and its pods and records
every call. The systemd strategy restarts a real unit on the test host (tests/integration/test_roles_testhost.py).
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import yaml

from tests.lib.playbook import REPO, ansible_playbook

PLAYBOOK = os.path.join(REPO, "playbooks", "enable_host.yml")
STANDIN = os.path.join(REPO, "tests", "lib", "kubectl_standin.py")

# Comments, blank lines, indentation, a nested disable_usb and a commented one, trailing blanks, a
# tab, non-ASCII text and CRLF on one line: everything but the top-level disable_usb line must stay.
HOST_CONF = (
    b"# Cloudpods host agent configuration\n"
    b"\n"
    b"region: region0\n"
    b"listen_interface: br0   # the bridge\n"
    b"# disable_usb: false\n"
    b"networks:\n"
    b"  - br0/br0/10.0.0.1\n"
    b"isolated_devices:\n"
    b"  disable_usb: true\n"
    b"disable_usb:   true  \n"
    b"\tweird_tab: 1\n"
    b"note: \xc3\xa9t\xc3\xa9 \r\n"
    b"last_key: 42\n"
)


class Fleet:
    """Hosts of an inventory that are all this machine, each with its own host.conf, and the stand-in kubectl."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        kubectl = self.bin / "kubectl"
        kubectl.write_text("#!%s\nimport runpy, sys\nsys.argv[0] = %r\nrunpy.run_path(%r, run_name='__main__')\n" % (sys.executable, STANDIN, STANDIN))
        kubectl.chmod(0o755)
        self.kube = tmp_path / "kube"
        self.kube.mkdir()
        self.kube_config(nodes=["node1", "node2"], pending_polls=2)

    def kube_config(self, **config):
        (self.kube / "config.json").write_text(json.dumps(config))

    def conf(self, host):
        return self.tmp / ("%s.conf" % host)

    def calls(self):
        path = self.kube / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def forget_calls(self):
        (self.kube / "calls.jsonl").unlink(missing_ok=True)

    def run(self, hosts=("node1",), check=False, diff=False, **variables):
        hostvars = {}
        for host in hosts:
            hostvars[host] = {
                "ansible_connection": "local",
                "ansible_python_interpreter": sys.executable,
                "usb_host_conf_path": str(self.conf(host)),
                "usb_host_install_packages": False,
                "usb_host_kube_control_node": "localhost",
                "usb_host_restart_poll_interval": 1,
            }
            hostvars[host].update(variables)
        inventory = self.tmp / "inventory.yml"
        inventory.write_text(yaml.safe_dump({"all": {"hosts": hostvars}}))
        options = ["--check"] * check + ["--diff"] * diff
        env = {"PATH": "%s:%s" % (self.bin, os.environ["PATH"]), "KUBECTL_STANDIN_DIR": str(self.kube)}
        return ansible_playbook(inventory, PLAYBOOK, *options, env=env, timeout=600)


@pytest.fixture
def fleet(tmp_path):
    return Fleet(tmp_path)


def succeeded(process, changed=None):
    assert process.returncode == 0, process.stdout + process.stderr
    if changed is not None:
        assert {host: recap["changed"] for host, recap in process.recap.items() if host != "localhost"} == changed, process.stdout
    return process


def failed(process, *fragments):
    assert process.returncode != 0, process.stdout
    for fragment in fragments:
        assert fragment in process.stdout, process.stdout
    return process


# host.conf


def test_only_the_disable_usb_line_changes_byte_for_byte_and_a_second_run_changes_nothing(fleet):
    conf = fleet.conf("node1")
    conf.write_bytes(HOST_CONF)
    conf.chmod(0o640)
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 1})
    assert conf.read_bytes() == HOST_CONF.replace(b"\ndisable_usb:   true  \n", b"\ndisable_usb: false\n")
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 0})
    assert conf.read_bytes() == HOST_CONF.replace(b"\ndisable_usb:   true  \n", b"\ndisable_usb: false\n")


def test_check_mode_with_diff_shows_the_line_and_writes_nothing(fleet):
    conf = fleet.conf("node1")
    conf.write_bytes(HOST_CONF)
    process = succeeded(fleet.run(check=True, diff=True, usb_host_restart_strategy="none"), changed={"node1": 1})
    assert "-disable_usb:   true  \n+disable_usb: false\n" in process.stdout
    assert conf.read_bytes() == HOST_CONF


def test_missing_line_is_added_at_the_end_and_disabled_passthrough_writes_true(fleet):
    conf = fleet.conf("node1")
    conf.write_bytes(b"region: region0\n# the end\n")
    succeeded(fleet.run(usb_host_restart_strategy="none", usb_passthrough_enabled=False), changed={"node1": 1})
    assert conf.read_bytes() == b"region: region0\n# the end\ndisable_usb: true\n"
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 1})
    assert conf.read_bytes() == b"region: region0\n# the end\ndisable_usb: false\n"


def test_file_without_final_newline_gets_one_only_where_a_line_is_added(fleet):
    conf = fleet.conf("node1")
    conf.write_bytes(b"disable_usb: true\nlast: 1")
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 1})
    assert conf.read_bytes() == b"disable_usb: false\nlast: 1"
    conf.write_bytes(b"last: 1")
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 1})
    assert conf.read_bytes() == b"last: 1\ndisable_usb: false\n"


def test_absent_file_is_created_private_and_backup_keeps_the_old_one(fleet):
    conf = fleet.conf("node1")
    succeeded(fleet.run(usb_host_restart_strategy="none"), changed={"node1": 1})
    assert conf.read_bytes() == b"disable_usb: false\n"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    succeeded(fleet.run(usb_host_restart_strategy="none", usb_passthrough_enabled=False, usb_host_conf_backup=True), changed={"node1": 1})
    backups = [path for path in fleet.tmp.iterdir() if path.name.startswith("node1.conf.") and path.name.endswith("~")]
    assert [path.read_bytes() for path in backups] == [b"disable_usb: false\n"]
    assert conf.read_bytes() == b"disable_usb: true\n"


# kubectl: delete this node's pod, wait for its replacement


def test_kubectl_restarts_the_pod_of_a_changed_host_only_and_waits_for_running(fleet):
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    fleet.conf("node2").write_bytes(b"disable_usb: false\n")
    process = succeeded(fleet.run(hosts=("node1", "node2")), changed={"node1": 2, "node2": 0})
    get_pods = [
        "--namespace=onecloud", "get", "pods", "--selector=app=host,component=default-host",
        "--field-selector=spec.nodeName=node1", "--output=json",
    ]
    assert fleet.calls() == [
        ["--namespace=onecloud", "get", "daemonset", "default-host", "--output=json"],
        get_pods,
        ["--namespace=onecloud", "delete", "pod", "--wait=false", "default-host-node1-1"],
        get_pods,  # Pending
        get_pods,  # Pending
        get_pods,  # Running
    ]
    assert "node1 -> localhost" in process.stdout
    fleet.forget_calls()
    succeeded(fleet.run(hosts=("node1", "node2")), changed={"node1": 0, "node2": 0})
    assert fleet.calls() == []


def test_kubectl_in_check_mode_looks_but_deletes_nothing(fleet):
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    succeeded(fleet.run(check=True))
    assert [call[1:3] for call in fleet.calls()] == [["get", "daemonset"], ["get", "pods"]]
    assert fleet.conf("node1").read_bytes() == b"disable_usb: true\n"


def test_kubectl_timeout_is_a_clear_error(fleet):
    fleet.kube_config(nodes=["node1"], pending_polls=-1)
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    failed(
        fleet.run(usb_host_restart_timeout=3),
        "The pod of daemonset onecloud/default-host on node node1 was deleted, but no new pod was Running there within 3 s"
        " (usb_host_restart_timeout). Last seen: default-host-node1-2 Pending",
    )
    assert len([call for call in fleet.calls() if call[1:3] == ["get", "pods"]]) == 1 + 4  # before the delete, then 1 + 3 retries


def test_kubectl_without_a_pod_on_the_node_names_the_setting(fleet):
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    failed(fleet.run(usb_host_kube_node_name="kvm-a"), "No pod of daemonset onecloud/default-host", "is on node kvm-a", "usb_host_kube_node_name")
    assert not any(call[1] == "delete" for call in fleet.calls())


def test_kubectl_and_rollout_need_the_control_node(fleet):
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    failed(fleet.run(usb_host_kube_control_node=None), "usb_host_restart_strategy kubectl needs usb_host_kube_control_node")
    failed(fleet.run(usb_host_restart_strategy="systemd"), "usb_host_restart_strategy systemd needs usb_host_systemd_unit")
    failed(fleet.run(usb_host_restart_strategy="reboot"), "usb_host_restart_strategy", "kubectl, rollout, systemd, none")
    assert fleet.conf("node1").read_bytes() == b"disable_usb: true\n"


# rollout: one restart of the daemonset for the whole play


def test_rollout_restarts_the_daemonset_once_for_all_changed_hosts(fleet):
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    fleet.conf("node2").write_bytes(b"x: 1\n")
    succeeded(fleet.run(hosts=("node1", "node2"), usb_host_restart_strategy="rollout"))
    assert fleet.calls() == [
        ["--namespace=onecloud", "rollout", "restart", "daemonset/default-host"],
        ["--namespace=onecloud", "rollout", "status", "daemonset/default-host", "--timeout=300s"],
    ]
    fleet.forget_calls()
    succeeded(fleet.run(hosts=("node1", "node2"), usb_host_restart_strategy="rollout"), changed={"node1": 0, "node2": 0})
    assert fleet.calls() == []


def test_rollout_timeout_is_a_clear_error(fleet):
    fleet.kube_config(nodes=["node1"], pending_polls=0, rollout_fails=True)
    fleet.conf("node1").write_bytes(b"disable_usb: true\n")
    failed(
        fleet.run(usb_host_restart_strategy="rollout", usb_host_restart_timeout=60),
        "The restarted daemonset onecloud/default-host did not finish rolling out within 60 s (usb_host_restart_timeout):"
        " error: timed out waiting for the condition",
    )
