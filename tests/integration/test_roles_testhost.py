"""The roles and playbooks on the real-USB test host: enable_host.yml (the host role, systemd strategy),
converge.yml from a declared inventory with exclusive, probe.yml after an unplug, and report.yml opened in
headless Chromium.

The kubectl and rollout strategies cannot meet a real Kubernetes cluster here: they run against a stand-in
kubectl on PATH that records its calls, in tests/unit/test_host_role.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections.abc import Iterator

import pytest

from tests.testhost import TestHost
from tests.lib.playbook import shown
from tests.testhost.ansible import play, run_module, usb_facts
from tests.testhost.devices import SERIAL_ADAPTER, STICK, TWIN_A, TWIN_B
from tests.testhost.guest import dumpxml
from tests.testhost.paths import REPO

CHROMIUM = [
    "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


UNIT = "kvmhost-hostagent"
UNIT_TEXT = "[Unit]\nDescription=Stand-in for the Cloudpods host agent\n[Service]\nExecStart=/bin/sleep infinity\n"
CONF_DIR = "/root/kvmhost-roles-test"
CONF = CONF_DIR + "/host.conf"
# Comments, blank lines, indentation, a nested and a commented disable_usb, trailing blanks, non-ASCII, CRLF.
HOST_CONF = (
    "# Cloudpods host agent\n"
    "\n"
    "region: region0\n"
    "listen_interface: br0   # the bridge\n"
    "# disable_usb: false\n"
    "isolated_devices:\n"
    "  disable_usb: true\n"
    "disable_usb: true\n"
    "note: \u00e9t\u00e9 \r\n"
    "last_key: 42\n"
)


def remote_bytes(host: TestHost, path: str) -> bytes:
    return base64.b64decode(host.ssh("base64", "-w0", path).stdout)


def invocation(host: TestHost) -> str:
    return host.ssh("systemctl", "show", "--property=InvocationID", "--value", UNIT).stdout.strip()


def products(host: TestHost, guest: str) -> list[str]:
    return sorted(device["product"] for device in host.guest_usb(guest))


# The host role with the systemd strategy, on a real unit.


@pytest.fixture
def host_agent(testhost: TestHost) -> Iterator[TestHost]:
    """A stand-in host agent unit on the test host and a host.conf of our own."""
    testhost.ssh("mkdir", "-p", CONF_DIR, "/run/systemd/system")
    testhost.ssh("sh", "-c", "cat > /run/systemd/system/%s.service" % UNIT, input=UNIT_TEXT)
    testhost.ssh("systemctl", "daemon-reload")
    testhost.ssh("systemctl", "start", UNIT)
    testhost.ssh("sh", "-c", "cat > " + CONF, input=HOST_CONF)
    try:
        yield testhost
    finally:
        testhost.ssh("systemctl", "stop", UNIT, check=False)
        testhost.ssh("rm", "-rf", CONF_DIR, "/run/systemd/system/%s.service" % UNIT, check=False)
        testhost.ssh("systemctl", "daemon-reload", check=False)


def test_host_role_edits_one_line_and_restarts_the_unit_only_on_change(host_agent: TestHost, tmp_path) -> None:
    settings = {"usb_host_conf_path": CONF, "usb_host_restart_strategy": "systemd", "usb_host_systemd_unit": UNIT}
    original = HOST_CONF.encode()
    assert remote_bytes(host_agent, CONF) == original
    started = invocation(host_agent)

    checked = play(host_agent, "enable_host.yml", tmp_path, settings, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout
    assert "-disable_usb: true\n+disable_usb: false\n" in checked.stdout
    assert remote_bytes(host_agent, CONF) == original
    assert invocation(host_agent) == started

    done = play(host_agent, "enable_host.yml", tmp_path, settings)
    assert (done.returncode, done.changed) == (0, 2), done.stdout  # host.conf, and the restart
    assert remote_bytes(host_agent, CONF) == original.replace(b"\ndisable_usb: true\n", b"\ndisable_usb: false\n")
    restarted = invocation(host_agent)
    assert restarted != started
    assert run_module(host_agent, "kvmhost.usb.usb_facts", {"host_conf": CONF})["ansible_facts"]["passthrough_enabled"] is True

    again = play(host_agent, "enable_host.yml", tmp_path, settings)
    assert (again.returncode, again.changed) == (0, 0), again.stdout
    assert invocation(host_agent) == restarted
    assert "Restart the host service with systemd" not in again.stdout


# The declared state: converge, probe after an unplug, report. Without the reattach agent, which would
# re-bind the replugged device by itself (tests/integration/test_agent_testhost.py): here a replug stays
# drift until the next converge.

DECLARED = {
    "roles-a": {
        "devices": [{"vendor_id": "46f4", "product_id": "0001", "serial": "KING0001"}, TWIN_A],
        "exclusive": True,
        "controller": "qemu-xhci",
    },
    "roles-b": {"devices": ["0403:6001"], "auto_start": True},
}

DECLARED_VARS = {"usb_passthrough": DECLARED, "usb_passthrough_agent": False}


@pytest.fixture(scope="module")
def fleet(testhost: TestHost) -> Iterator[TestHost]:
    """roles-a runs and holds TWIN-B, which it does not declare; roles-b is defined and shut off."""
    for name in DECLARED:
        testhost.remove_guest(name)
    testhost.create_guest("roles-a")
    testhost.create_guest("roles-b", start=False)
    assert not run_module(testhost, "kvmhost.usb.usb_attach", {"domain": "roles-a", "devices": [TWIN_B]})["failed"]
    try:
        yield testhost
    finally:
        for name in DECLARED:
            testhost.remove_guest(name)
        if testhost.kernel_device(serial="TWIN-A") is None:
            testhost.plug("twin-a")
            testhost.wait_usb(lambda devices: any(d["serial"] == "TWIN-A" for d in devices))


def test_converge_makes_each_domain_hold_exactly_what_it_declares(fleet: TestHost, tmp_path) -> None:
    assert products(fleet, "roles-a") == ["QEMU USB Mouse"]
    done = play(fleet, "converge.yml", tmp_path, DECLARED_VARS)
    assert done.returncode == 0, done.stdout
    changes = shown(done, "kvmhost.usb.passthrough : Report what changed")
    assert sorted(changes) == ["roles-a", "roles-b"]
    assert changes["roles-b"][-1] == "start roles-b"
    assert products(fleet, "roles-a") == ["QEMU USB HARDDRIVE", "QEMU USB Mouse"]
    assert len(products(fleet, "roles-b")) == 1
    held = {device["id"]: device["attached_to"] for device in usb_facts(fleet, include_hubs=False)}
    assert held[STICK] == held[TWIN_A] == {"live": ["roles-a"], "persistent": ["roles-a"]}
    assert held[SERIAL_ADAPTER] == {"live": ["roles-b"], "persistent": ["roles-b"]}
    assert held[TWIN_B] == {"live": [], "persistent": []}

    again = play(fleet, "converge.yml", tmp_path, DECLARED_VARS)
    assert (again.returncode, again.changed) == (0, 0), again.stdout


def test_probe_after_an_unplug_reports_the_missing_device_and_the_stale_hostdev(fleet: TestHost, tmp_path) -> None:
    twin_a = fleet.kernel_device(serial="TWIN-A")
    address = "%03d:%03d" % (int(twin_a["busnum"]), int(twin_a["devnum"]))
    fleet.unplug("twin-a")
    fleet.wait_usb(lambda devices: not any(d["serial"] == "TWIN-A" for d in devices))
    before = (dumpxml(fleet, "roles-a"), dumpxml(fleet, "roles-a", inactive=True))
    probe = play(fleet, "probe.yml", tmp_path, DECLARED_VARS, "--diff")
    assert (probe.returncode, probe.changed) == (0, 0), probe.stdout
    summary = shown(probe, "Show the probe")
    assert summary["missing"] == ["roles-a: %s (recorded in its intent), not plugged in" % TWIN_A]
    assert "roles-a (persistent): hostdev 0627:0001 at %s, where no such device is" % address in summary["stale"]
    assert TWIN_B in summary["unclaimed"]
    assert not any(line.startswith(TWIN_A) for line in summary["present"])
    assert (dumpxml(fleet, "roles-a"), dumpxml(fleet, "roles-a", inactive=True)) == before

    fleet.plug("twin-a")
    fleet.wait_usb(lambda devices: any(d["serial"] == "TWIN-A" for d in devices))


def test_report_shows_hosts_devices_holders_and_drift_in_chromium(fleet: TestHost, tmp_path) -> None:
    # TWIN-A is back with a new device number: roles-a's hostdev for it is stale until the next converge.
    page = tmp_path / "usb-report.html"
    report = play(fleet, "report.yml", tmp_path, DECLARED_VARS, "-e", "usb_report_path=%s" % page)
    assert report.returncode == 0, report.stdout
    html = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html), "the page must be self-contained"
    text = dump_text(page, tmp_path)
    assert "USB passthrough across the fleet" in text
    assert "testhost drift" in text, report.stdout
    assert re.search(r"stale roles-a \(persistent\) has a hostdev 0627:0001 bound to \d{3}:\d{3} ?, where no such device is", text), text
    assert re.search(r"2-1 %s .*?→ roles-a" % re.escape(STICK), text)
    assert re.search(r"1-5\.1 %s .*?→ roles-b" % re.escape(SERIAL_ADAPTER), text)
    assert "unclaimed %s" % TWIN_B in text
    assert re.search(r"roles-b running yes %s" % re.escape(SERIAL_ADAPTER), text)
    screenshot(page, tmp_path)

    # The next converge re-binds TWIN-A, and the page says the host is as declared.
    assert play(fleet, "converge.yml", tmp_path, DECLARED_VARS).returncode == 0
    assert play(fleet, "report.yml", tmp_path, DECLARED_VARS, "-e", "usb_report_path=%s" % page).returncode == 0
    assert "testhost as declared" in dump_text(page, tmp_path)


def dump_text(page, tmp_path) -> str:
    dom = subprocess.run(
        CHROMIUM + ["--user-data-dir=%s" % (tmp_path / "chromium"), "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def screenshot(page, tmp_path) -> None:
    """A picture of the page for a person to look at (kept in build/testhost/ for the last run)."""
    target = os.path.join(REPO, "build", "testhost", "usb-report.png")
    subprocess.run(
        CHROMIUM + ["--user-data-dir=%s" % (tmp_path / "chromium"), "--window-size=1400,1400", "--screenshot=%s" % target, page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert os.path.getsize(target) > 10000


def test_the_role_installs_the_host_runtime_in_one_task_and_a_converged_host_costs_at_most_12_tasks(fleet: TestHost, tmp_path) -> None:
    with_agent = dict(DECLARED_VARS, usb_passthrough_agent=True)
    first = play(fleet, "converge.yml", tmp_path, with_agent)
    assert first.returncode == 0, first.stdout
    assert first.stdout.count("TASK [kvmhost.usb.passthrough : Install or remove the host runtime (kvmhost-usb)]") == 1
    unit = fleet.ssh("systemctl", "cat", "kvmhost-usb-agent.service").stdout
    assert "ExecStart=/usr/bin/python3 /usr/lib/kvmhost-usb/kvmhost-usb.pyz agent" in unit
    assert fleet.ssh("systemctl", "is-active", "kvmhost-usb-agent.service").stdout.strip() == "active"

    words = fleet.ssh("kvmhost-usb", "status").stdout
    report = json.loads(fleet.ssh("kvmhost-usb", "status", "--json").stdout)
    version = fleet.ssh("kvmhost-usb", "version").stdout.split()
    assert version == ["kvmhost-usb", report["version"], report["hash"]]
    assert report["services"]["agent"]["ActiveState"] == "active"
    held = dict((item["id"], item["domains"]) for item in report["attached"])
    assert held[STICK] == held[TWIN_A] == ["roles-a"] and held[SERIAL_ADAPTER] == ["roles-b"]
    assert TWIN_B not in held
    assert re.search(r"^agent +active \(running\), pid \d+", words, re.M), words
    assert "attached  %s at 2-1 to roles-a (live)" % STICK in words

    again = play(fleet, "converge.yml", tmp_path, with_agent)
    recap = again.recap["testhost"]  # type: ignore[attr-defined]
    assert (again.returncode, recap["changed"]) == (0, 0), again.stdout
    # 12 tasks, and the listing of domains for usb_fleet (skipped without it).
    assert recap["ok"] + recap["skipped"] <= 13, recap

    # Leave the host as the fixture found it: no agent (and this proves state absent under the real systemd).
    gone = play(fleet, "converge.yml", tmp_path, DECLARED_VARS)
    assert gone.returncode == 0 and gone.changed == 1, gone.stdout
    assert fleet.ssh("test", "-e", "/usr/lib/kvmhost-usb/kvmhost-usb.pyz", check=False).returncode == 1
    assert fleet.ssh("systemctl", "is-active", "kvmhost-usb-agent.service", check=False).stdout.strip() == "inactive"
