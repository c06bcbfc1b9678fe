"""The event source kvmhost.usb.usb_events (extensions/eda/plugins/event_source/usb_events.py): the events of KVM hosts
followed over ssh, filtered, resumed without duplicates after a session ends, and the errors it gives at start.

No KVM host is reachable from the unit tier, so a real ssh client has nothing to talk to: a stand-in ``ssh``
(tests/lib/ssh_standin.py) is put first on PATH and plays the remote side, each host's ``kvmhost-usb version``,
``events`` and ``events --follow`` sessions as the test scripts them, and records every ssh command line. Everything
else is real: the inventory read by ansible-core, the subprocesses, the asyncio loop, and ansible-rulebook itself in
the last test.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.lib.playbook import REPO, collection_root

sys.path.insert(0, collection_root())

from ansible_collections.kvmhost.usb.extensions.eda.plugins.event_source import usb_events  # noqa: E402

STANDIN = os.path.join(REPO, "tests", "lib", "ssh_standin.py")
LOGGER = "kvmhost.usb.usb_events"
FAST = {"delay": 0.02, "max_delay": 0.2}
DONGLE = {"id": "0529:0001:1A2B3C", "vendor_id": "0529", "product_id": "0001", "serial": "1A2B3C", "port": "1-2", "product": "HASP"}
STICK = {"id": "0951:1666:E0D55E", "vendor_id": "0951", "product_id": "1666", "serial": "E0D55E", "port": "2-1.4", "product": "DataTraveler"}

INVENTORY = """
all:
  children:
    kvm:
      hosts:
        kvm1:
          ansible_host: "{{ inventory_hostname }}.example"
        kvm2:
"""


def event(seq, kind="added", host="kvm1", **extra):
    return dict({"kind": kind, "host": host, "seq": seq, "time": "2026-05-04T10:00:%02dZ" % (seq % 60)}, **extra)


class Hosts:
    """An inventory of kvm1 and kvm2 and the stand-in ssh first on PATH; ``script`` says what each host answers."""

    def __init__(self, tmp_path, monkeypatch):
        self.dir = tmp_path / "ssh"
        self.dir.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        ssh = bin_dir / "ssh"
        ssh.write_text("#!%s\nimport runpy, sys\nsys.argv[0] = %r\nrunpy.run_path(%r, run_name='__main__')\n" % (sys.executable, STANDIN, STANDIN))
        ssh.chmod(0o755)
        self.path = "%s%s%s" % (bin_dir, os.pathsep, os.environ["PATH"])
        monkeypatch.setenv("PATH", self.path)
        monkeypatch.setenv("SSH_STANDIN_DIR", str(self.dir))
        root = tmp_path / "inventory"
        (root / "group_vars").mkdir(parents=True)
        (root / "host_vars").mkdir()
        (root / "hosts.yml").write_text(INVENTORY)
        common_args = "-o StrictHostKeyChecking=no -o 'ProxyCommand=nc -x proxy %h %p'"
        (root / "group_vars" / "kvm.yml").write_text('ansible_user: admin\nansible_ssh_common_args: "%s"\n' % common_args)
        (root / "host_vars" / "kvm2.yml").write_text("ansible_host: kvm2.example\nansible_port: 2202\nansible_ssh_private_key_file: ~/.ssh/kvm2\n")
        self.inventory = str(root)
        self.script()

    def script(self, **hosts):
        """What each destination answers (see tests/lib/ssh_standin.py); a destination not given is unreachable."""
        hosts = {name.replace("_", "."): value for name, value in hosts.items()}
        (self.dir / "hosts.json").write_text(json.dumps(hosts))

    def calls(self, host=None, follow=None):
        path = self.dir / "calls.jsonl"
        calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        calls = [call for call in calls if host is None or call["host"] == host]
        return [call["argv"] for call in calls if follow is None or ("--follow" in call["argv"]) == follow]

    def args(self, **extra):
        return dict(dict(FAST, inventory=self.inventory), **extra)


@pytest.fixture
def hosts(tmp_path, monkeypatch):
    return Hosts(tmp_path, monkeypatch)


def collect(args, count, settle=0.3, timeout=15, until=None):
    """Run the source until it has put ``count`` events on its queue, and ``settle`` seconds more (any event then is
    also returned), or until ``until()`` holds, ``timeout`` at the most; then cancel it, as ansible-rulebook does at
    shutdown."""

    async def run():
        queue = asyncio.Queue()
        source = asyncio.ensure_future(usb_events.main(queue, args))
        events = []
        deadline = time.monotonic() + timeout
        try:
            while len(events) < count:
                get = asyncio.ensure_future(queue.get())
                done, _pending = await asyncio.wait({get, source}, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if source in done:
                        source.result()
                    raise AssertionError("%d events of %d within %s s: %s" % (len(events), count, timeout, events))
                events.append(get.result())
            await asyncio.sleep(settle)
            while until is not None and not until() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while not queue.empty():
                events.append(queue.get_nowait())
        finally:
            source.cancel()
            await asyncio.gather(source, return_exceptions=True)
            # The killed ssh sessions' pipes are closed by the loop's next turns: let it take them before it closes.
            await asyncio.sleep(0.1)
        return events

    return asyncio.run(run())


def start_error(args):
    with pytest.raises(ValueError) as error:
        asyncio.run(usb_events.main(asyncio.Queue(), args))
    return str(error.value)


def waits(caplog):
    return [float(match) for match in re.findall(r"reconnecting in ([0-9.]+) s", caplog.text)]


# Reading the inventory and the events.


def test_each_host_is_reached_as_ansible_reaches_it_in_batch_mode_with_a_keepalive(hosts):
    settings = usb_events.settings_of(hosts.args(keepalive=7, connect_timeout=4))
    reached = dict((host.name, host.ssh) for host in usb_events.load_hosts(settings))
    common = ["-o", "StrictHostKeyChecking=no", "-o", "ProxyCommand=nc -x proxy %h %p"]
    keepalive = ["-o", "ServerAliveInterval=7", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=4"]
    assert reached["kvm1"] == ["ssh", "-T", "-o", "BatchMode=yes", "-l", "admin"] + common + keepalive + ["--", "kvm1.example"]
    key = os.path.expanduser("~/.ssh/kvm2")
    assert reached["kvm2"] == ["ssh", "-T", "-o", "BatchMode=yes", "-p", "2202", "-l", "admin", "-i", key] + common + keepalive + ["--", "kvm2.example"]
    assert [host.name for host in usb_events.load_hosts(usb_events.settings_of(hosts.args(limit="kvm2")))] == ["kvm2"]


def test_a_line_that_is_not_an_object_with_an_integer_seq_is_logged_and_skipped(caplog):
    assert usb_events.parse_line("kvm1", b'{"kind": "added", "host": "kvm1", "seq": 3}\n') == {"kind": "added", "host": "kvm1", "seq": 3}
    for line, why in [
        (b"Traceback (most recent call last):", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"kind": "added"}', "no integer seq"),
        (b'{"seq": "3"}', "no integer seq"),
        (b'{"seq": true}', "no integer seq"),
    ]:
        caplog.clear()
        assert usb_events.parse_line("kvm1", line) is None
        assert "kvm1: skipped a malformed line of kvmhost-usb events (%s)" % why in caplog.text
    assert usb_events.parse_line("kvm1", b"\n") is None


def test_kinds_domain_and_selector_filter_the_events(hosts):
    def passing(events, **args):
        settings = usb_events.settings_of(hosts.args(**args))
        return [item["seq"] for item in events if usb_events.wanted(item, "kvm1", settings)]

    events = [
        event(1, "added", device=DONGLE),
        event(2, "attached", device=DONGLE, domain="buildvm", by="agent"),
        event(3, "attached", device=STICK, domain="testvm", by="converge"),
        event(4, "link_down", peer="kvm2", reason="timeout"),
        event(5, "missing", device=STICK, domain="testvm"),
    ]
    assert passing(events) == [1, 2, 3, 4, 5]
    assert passing(events, kinds=["attached", "missing"]) == [2, 3, 5]
    assert passing(events, kinds="added,link_down") == [1, 4]
    assert passing(events, domain="testvm") == [3, 5]
    # usb_attach's selectors, normalised by its own code: upper-case hex, a string, a list, a host.
    assert passing(events, selector={"vendor_id": "0x0529", "product_id": "0001"}) == [1, 2]
    assert passing(events, selector="0951:1666") == [3, 5]
    assert passing(events, selector=["1-2", {"serial": "E0D55E"}], kinds=["attached"]) == [2, 3]
    assert passing(events, selector={"host": "kvm1", "id": "0951:1666:E0D55E"}) == [3, 5]
    assert passing(events, selector={"host": "kvm2", "id": "0951:1666:E0D55E"}) == []


# Following.


def test_a_session_closed_by_a_failure_is_resumed_with_since_the_last_seq_and_no_event_twice(hosts, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hosts.script(
        kvm1_example={
            "sessions": [
                {"lines": [event(1, device=DONGLE), event(2, "attached", device=DONGLE), event(3, "detached", device=DONGLE)], "rc": 255,
                 "stderr": "Connection to kvm1.example closed by remote host.\n"},
                # The host gives seq 3 again (it says > SEQ, but the source trusts no one): dropped.
                {"lines": [event(3, "detached", device=DONGLE), event(4, "removed", device=DONGLE)], "hang": True},
            ]
        }
    )
    events = collect(hosts.args(limit="kvm1", history=True), 4)
    assert [item["seq"] for item in events] == [1, 2, 3, 4]
    assert events[0] == event(1, device=DONGLE), "the runtime's event is put on the queue as it is"
    first, second = hosts.calls("kvm1.example", follow=True)
    assert first[first.index("--") + 1:] == ["kvm1.example", "kvmhost-usb", "events", "--follow"]
    assert second[second.index("--") + 1:] == ["kvm1.example", "kvmhost-usb", "events", "--follow", "--since", "3"]
    assert "kvm1: kvmhost-usb events ended (exit 255: Connection to kvm1.example closed by remote host.)" in caplog.text


def test_a_host_closing_its_stream_is_followed_again(hosts):
    hosts.script(kvm1_example={"sessions": [{"lines": [event(7)], "rc": 0}, {"lines": [], "rc": 0}, {"lines": [event(8)], "hang": True}]})
    events = collect(hosts.args(limit="kvm1", history=True), 2)
    assert [item["seq"] for item in events] == [7, 8]
    sinces = [argv[argv.index("--follow") + 1:] for argv in hosts.calls("kvm1.example", follow=True)]
    assert sinces == [[], ["--since", "7"], ["--since", "7"]]


def test_the_wait_doubles_up_to_max_delay_and_is_back_to_delay_after_a_healthy_session(hosts, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    failed = {"lines": [], "rc": 255, "stderr": "ssh: connect to host kvm1.example port 22: Connection refused\n"}
    hosts.script(kvm1_example={"sessions": [failed, failed, failed, {"lines": [event(1)], "rc": 255}, failed, {"lines": [event(2)], "hang": True}]})
    events = collect(hosts.args(limit="kvm1", history=True, delay=0.05, max_delay=0.15), 2)
    assert [item["seq"] for item in events] == [1, 2]
    assert waits(caplog) == [0.05, 0.1, 0.15, 0.05, 0.05]


def test_a_malformed_line_is_logged_and_skipped_and_the_session_goes_on(hosts, caplog):
    hosts.script(
        kvm1_example={"sessions": [{"lines": [event(1), "Traceback (most recent call last):", "[1, 2]", '{"seq": "2"}', event(2)], "hang": True}]}
    )
    events = collect(hosts.args(limit="kvm1", history=True), 2)
    assert [item["seq"] for item in events] == [1, 2]
    assert caplog.text.count("kvm1: skipped a malformed line of kvmhost-usb events") == 3
    assert len(hosts.calls("kvm1.example", follow=True)) == 1


def test_two_hosts_are_followed_at_once_and_their_events_carry_their_host(hosts):
    hosts.script(
        kvm1_example={"sessions": [{"lines": [event(1, host="kvm1"), event(2, "attached", host="kvm1")], "hang": True}]},
        **{"kvm2.example": {"sessions": [{"lines": [event(1, host="kvm2"), event(2, "link_down", host="kvm2", peer="kvm1")], "pause": 0.05, "hang": True}]}},
    )
    events = collect(hosts.args(history=True), 4)
    assert sorted((item["host"], item["seq"]) for item in events) == [("kvm1", 1), ("kvm1", 2), ("kvm2", 1), ("kvm2", 2)]
    (kvm2,) = hosts.calls("kvm2.example", follow=True)
    assert kvm2[kvm2.index("--") - 6:kvm2.index("--")] == ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=3", "-o", "ConnectTimeout=10"]


def test_without_history_it_starts_where_the_events_of_the_host_stand(hosts):
    kept = "".join(json.dumps(event(seq)) + "\n" for seq in (3, 4, 5))
    hosts.script(kvm1_example={"events": {"rc": 0, "stdout": kept}, "sessions": [{"lines": [event(6)], "hang": True}]})
    events = collect(hosts.args(limit="kvm1"), 1)
    assert [item["seq"] for item in events] == [6]
    (follow,) = hosts.calls("kvm1.example", follow=True)
    assert follow[follow.index("--follow"):] == ["--follow", "--since", "5"]


def test_a_host_whose_history_restarted_gives_every_event_it_keeps(hosts, caplog):
    kept = json.dumps(event(5)) + "\n"
    refused = {"lines": [], "rc": 2, "stderr": "kvmhost-usb events: --since 5 is newer than the last event of this host (1)\n"}
    hosts.script(kvm1_example={"events": {"stdout": kept}, "sessions": [refused, {"lines": [event(1)], "hang": True}]})
    events = collect(hosts.args(limit="kvm1"), 1)
    assert [item["seq"] for item in events] == [1]
    sinces = [argv[argv.index("--follow") + 1:] for argv in hosts.calls("kvm1.example", follow=True)]
    assert sinces == [["--since", "5"], []]
    assert "kvm1: it has no event after seq 5 any more" in caplog.text


def test_kinds_are_asked_of_the_host_and_an_event_filtered_out_still_moves_the_last_seq_on(hosts):
    hosts.script(
        kvm1_example={
            "sessions": [
                {"lines": [event(1, "removed", device=DONGLE), event(2, "added", device=STICK), event(3, "added", device=DONGLE)], "rc": 255},
                {"lines": [event(4, "added", device=DONGLE)], "hang": True},
            ]
        }
    )
    events = collect(hosts.args(limit="kvm1", history=True, kinds=["added", "missing"], selector={"vendor_id": "0529"}), 2)
    assert [item["seq"] for item in events] == [3, 4]
    sinces = [argv[argv.index("--follow") + 1:] for argv in hosts.calls("kvm1.example", follow=True)]
    assert sinces == [["--kinds", "added,missing"], ["--since", "3", "--kinds", "added,missing"]]


def test_a_host_unreachable_at_start_is_followed_all_the_same(hosts, caplog):
    hosts.script(kvm1_example={"sessions": [{"lines": [event(1)], "hang": True}]})
    events = collect(hosts.args(history=True), 1, until=lambda: hosts.calls("kvm2.example", follow=True))
    assert [item["host"] for item in events] == ["kvm1"]
    assert "kvm2: cannot check the runtime now (exit 255: ssh: Could not resolve hostname kvm2.example" in caplog.text
    assert hosts.calls("kvm2.example", follow=True), "kvm2 is tried again"


# The errors at start.


def test_a_pattern_that_matches_no_host_is_an_error(hosts):
    assert start_error(hosts.args(limit="kvm9")) == "usb_events: no host of inventory %s matches 'kvm9'" % hosts.inventory
    assert "does not exist" in start_error(hosts.args(inventory="/nonexistent/hosts.yml"))
    assert hosts.calls() == []


def test_a_host_without_the_runtime_is_an_error_that_says_what_to_run(hosts):
    missing = {"rc": 127, "stderr": "bash: line 1: kvmhost-usb: command not found\n"}
    hosts.script(kvm1_example={"version": missing}, **{"kvm2.example": {"version": missing}})
    message = start_error(hosts.args())
    assert message.startswith("usb_events: kvm1, kvm2 lack(s) the host runtime kvmhost-usb")
    assert "kvmhost.usb.passthrough" in message and "kvmhost.usb.usb_runtime" in message
    assert hosts.calls(follow=True) == []


def test_an_unknown_kind_or_a_malformed_selector_is_an_error(hosts):
    message = start_error(hosts.args(kinds=["added", "plugged"]))
    assert message == "usb_events: unknown kind(s) plugged in 'kinds'; known kinds: " + ", ".join(usb_events.KINDS)
    assert "Malformed vendor_id 'zz'" in start_error(hosts.args(selector={"vendor_id": "zz"}))
    assert "must be above 0" in start_error(hosts.args(delay=0))
    assert hosts.calls() == []


# ansible-rulebook itself.

RULEBOOK = """
- name: A device is plugged in
  hosts: all
  sources:
    - name: usb
      kvmhost.usb.usb_events:
        inventory: {inventory}
        limit: kvm1
        history: true
        delay: 0.1
        kinds: [added]
  rules:
    - name: The dongle is plugged in
      condition: event.kind == "added" and event.device.id == "0529:0001:1A2B3C"
      actions:
        - debug:
            msg: "plugged {{{{ event.device.id }}}} into {{{{ event.host }}}} (seq {{{{ event.seq }}}})"
        - shutdown:
"""


@pytest.mark.skipif(shutil.which("java") is None, reason="ansible-rulebook needs a JDK (Debian: openjdk-17-jre-headless)")
def test_ansible_rulebook_runs_the_source_and_a_rule_fires(hosts, tmp_path):
    pytest.importorskip("ansible_rulebook")
    rulebook = tmp_path / "rulebook.yml"
    rulebook.write_text(RULEBOOK.format(inventory=hosts.inventory))
    hosts.script(kvm1_example={"sessions": [{"lines": [event(1, "added", device=STICK), "garbage", event(2, "added", device=DONGLE)], "hang": True}]})
    # The venv's ansible-galaxy finds the collection for ansible-rulebook.
    venv = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=os.pathsep.join([hosts.path, venv]), ANSIBLE_COLLECTIONS_PATH=collection_root())
    process = subprocess.run(
        [os.path.join(venv, "ansible-rulebook"), "--rulebook", str(rulebook), "--inventory", os.path.join(hosts.inventory, "hosts.yml")],
        capture_output=True, text=True, env=env, timeout=90, check=False, cwd=str(tmp_path),
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output
    assert "plugged 0529:0001:1A2B3C into kvm1 (seq 2)" in output
    assert "plugged 0951:1666" not in output


@pytest.mark.skipif(shutil.which("java") is None, reason="ansible-rulebook needs a JDK (Debian: openjdk-17-jre-headless)")
def test_the_example_rulebook_pages_once_an_hour_per_missing_device(hosts, tmp_path):
    """extensions/eda/rulebooks/page_on_missing.yml as shipped, its source's inventory from USB_INVENTORY."""
    pytest.importorskip("ansible_rulebook")
    hosts.script(
        kvm1_example={"events": {"stdout": json.dumps(event(4)) + "\n"}, "sessions": [{"lines": [
            event(5, "missing", device=DONGLE, domain="buildvm"),
            event(6, "missing", device=DONGLE, domain="buildvm"),
            event(7, "missing", device=STICK, domain="testvm"),
        ], "hang": True}]},
    )
    venv = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=os.pathsep.join([hosts.path, venv]), ANSIBLE_COLLECTIONS_PATH=collection_root(), USB_INVENTORY=hosts.inventory,
               PYTHONUNBUFFERED="1")
    command = [os.path.join(venv, "ansible-rulebook"), "--rulebook", "kvmhost.usb.page_on_missing", "--inventory", hosts.inventory,
               "--env-vars", "USB_INVENTORY"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path))
    lines = []
    try:
        deadline = time.monotonic() + 90
        for line in process.stdout:
            lines.append(line)
            if "0951:1666:E0D55E" in line or time.monotonic() > deadline:
                break
    finally:
        # ansible-rulebook's JVM ends the process at once on SIGTERM, without the sources' cleanup: the stand-in ssh
        # ends by itself when its parent is gone (a real ssh would at its next write).
        process.terminate()
        process.wait(timeout=30)
    pages = "".join(lines).replace("\n", " ").split("PAGE: ")[1:]
    assert len(pages) == 2, "".join(lines)
    assert pages[0].startswith("kvm1: USB device 0529:0001:1A2B3C (HASP, port 1-2) declared for domain buildvm is missing"), pages[0]
    assert pages[1].startswith("kvm1: USB device 0951:1666:E0D55E (DataTraveler, port 2-1.4) declared for domain testvm is missing"), pages[1]
