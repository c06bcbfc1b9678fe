"""playbooks/converge.yml (the kvmhost.usb.passthrough role), probe.yml and report.yml against this machine
(connection local): the test run's own libvirtd with diskless stopped domains, and a USB tree described to umockdev
(ansible-playbook runs under umockdev-run, so the modules it starts see that tree).

Live attach and real devices are on the test host: tests/integration/test_roles_testhost.py.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.lib.domain_xml import hostdev, hostdevs
from tests.lib.domains import Domains
from tests.lib.modrun import REPO, attach, run_playbook
from tests.lib.playbook import shown
from tests.lib.trees import KINGSTON_ID, TWINS

CHROMIUM = [
    "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def playbook(tmp_path, name, declared, *options, devices=TWINS):
    path = os.path.join(REPO, "playbooks", name + ".yml")
    process = run_playbook(tmp_path, {"kvm1": {"usb_passthrough": declared}}, path, *options, devices=devices)
    recap = process.recap.get("kvm1")
    assert recap, process.stdout + process.stderr
    process.changed = recap["changed"]
    process.failed = recap["failed"]
    return process


@pytest.fixture
def declared(domains: Domains):
    """Two stopped domains; the first holds an undeclared tablet (0627:0001:43) before the converge."""
    first = domains.define("role-a")
    second = domains.define("role-b")
    assert attach({"domain": first, "devices": ["0627:0001:43"]}, TWINS)["rc"] == 0
    return {
        first: {"devices": ["0951:1666"], "exclusive": True, "controller": "qemu-xhci"},
        second: {"devices": [{"vendor_id": "0627", "product_id": "0001", "serial": "42"}]},
    }


def test_converge_makes_each_domain_hold_what_it_declares_then_changes_nothing(tmp_path, domains, declared):
    first, second = sorted(declared)
    before = domains.snapshot()
    checked = playbook(tmp_path, "converge", declared, "--check", "--diff")
    assert checked.returncode == 0, checked.stdout
    assert domains.snapshot() == before
    done = playbook(tmp_path, "converge", declared, "--diff")
    assert done.returncode == 0, done.stdout
    assert hostdevs(domains.inactive(first)) == [hostdev("0951", "1666")]
    assert hostdevs(domains.inactive(second)) == [hostdev("0627", "0001", 1, 2)]
    changes = shown(done, "kvmhost.usb.passthrough : Report what changed")
    assert sorted(changes) == [first, second]
    assert [action.split(":")[0] for action in changes[first]] == [
        "detach from %s (persistent)" % first,
        "attach to %s (persistent)" % first,
        "record the intent of %s (persistent)" % first,
    ]
    assert changes == shown(checked, "kvmhost.usb.passthrough : Report what changed")
    again = playbook(tmp_path, "converge", declared)
    assert (again.returncode, again.changed) == (0, 0), again.stdout
    assert shown(again, "kvmhost.usb.passthrough : Report what changed") == "Every declared domain holds its declared devices: nothing to change."


def test_converge_swaps_two_domains_in_one_call_without_steal(tmp_path, domains):
    first = domains.define("role-swap-a")
    second = domains.define("role-swap-b")
    assert attach({"domain": first, "devices": ["0951:1666"]}, TWINS)["rc"] == 0
    assert attach({"domain": second, "devices": ["0627:0001:42"]}, TWINS)["rc"] == 0
    declared = {first: {"devices": ["0627:0001:42"]}, second: {"devices": ["0951:1666"]}}
    done = playbook(tmp_path, "converge", declared)
    assert done.returncode == 0, done.stdout
    assert hostdevs(domains.inactive(first)) == [hostdev("0627", "0001", 1, 2)]
    assert hostdevs(domains.inactive(second)) == [hostdev("0951", "1666")]
    # One module call for the host, whatever the number of domains.
    assert done.stdout.count("TASK [kvmhost.usb.passthrough : Converge the declared USB devices of the host]") == 1
    assert "usb_attach" not in done.stdout
    again = playbook(tmp_path, "converge", declared)
    assert (again.returncode, again.changed) == (0, 0), again.stdout


def test_converge_rejects_a_misspelt_setting_before_changing_anything(tmp_path, domains, declared):
    first = sorted(declared)[0]
    declared[first]["exlusive"] = True
    before = domains.snapshot()
    process = playbook(tmp_path, "converge", declared)
    assert process.failed == 1
    assert "usb_passthrough of kvm1: Domain %s: unknown setting(s) exlusive; accepted: devices, exclusive" % first in process.stdout
    assert domains.snapshot() == before


def test_probe_and_report_show_the_drift_and_change_nothing(tmp_path, domains, declared):
    first, second = sorted(declared)
    declared["kvmhost-usb-test-ghost"] = {"devices": ["abcd:0001"]}
    before = domains.snapshot()
    probe = playbook(tmp_path, "probe", declared, "--diff")
    assert (probe.returncode, probe.changed) == (0, 0), probe.stdout
    summary = shown(probe, "Show the probe")
    assert summary["missing"] == ["kvmhost-usb-test-ghost: vendor_id=abcd, product_id=0001 (declared in the inventory), not plugged in"]
    # Other tests of this run may have left domains behind: look at ours.
    assert sorted(line for line in summary["drift"] if line.split(" ")[0].rstrip(":") in declared) == sorted(
        [
            "%s: declares %s, held by nobody" % (first, KINGSTON_ID),
            "%s: declares 0627:0001:42, held by nobody" % second,
            "%s (exclusive): holds 0627:0001:43, which it does not declare" % first,
            "kvmhost-usb-test-ghost: declared, but the host has no such domain",
        ]
    )
    assert summary["unclaimed"] == []
    assert domains.snapshot() == before
    failing = playbook(tmp_path, "probe", declared, "-e", "usb_probe_fail_on_drift=true")
    assert failing.failed == 1 and "USB passthrough drifted from the declared state" in failing.stdout

    page = tmp_path / "fleet.html"
    report = playbook(tmp_path, "report", declared, "-e", "usb_report_path=%s" % page)
    assert report.returncode == 0, report.stdout
    assert "USB report written to %s" % page in report.stdout
    assert domains.snapshot() == before
    html = page.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", html), "the page must be self-contained"
    dom = subprocess.run(
        CHROMIUM + ["--user-data-dir=%s" % (tmp_path / "chromium"), "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "USB passthrough across the fleet" in text
    assert "kvm1 drift" in text
    assert re.search(r"0627:0001:43 Adomax Technology Co., Ltd QEMU USB Tablet 001:003 (→ \S+ )*→ %s" % first, text)
    assert "undeclared %s is exclusive and holds 0627:0001:43" % first in text
    assert "unknown domain kvmhost-usb-test-ghost is declared" in text
    assert "%s 002:002 2-1 Kingston Technology DataTraveler 100 G3/G4/SE9 G2/50 — %s" % (KINGSTON_ID, first) in text
    assert "not attached %s is declared for %s but held by" % (KINGSTON_ID, first) in text
