"""The host's events store and ``kvmhost-usb events`` (plugins/module_utils/_events.py): numbers that only go up,
across writers in separate processes, restarts and compactions; the CLI's contract (--since, --follow, --kinds, its
exit codes), run as the runtime runs it, in a process of its own."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest

from tests.lib.modrun import collection_root

sys.path.insert(0, collection_root())
from ansible_collections.kvmhost.usb.plugins.module_utils import _events  # noqa: E402

WRITER = """
import sys, time
from ansible_collections.kvmhost.usb.plugins.module_utils import _events
store = _events.Store(sys.argv[1], backlog=int(sys.argv[2]))
for index in range(int(sys.argv[3])):
    assert _events.emit("added", device={"id": "0951:1666:%s-%d" % (sys.argv[4], index)}, store=store) is not None
    time.sleep(float(sys.argv[5]))
"""


def env(tmp_path, **extra):
    return dict(os.environ, **dict(dict(PYTHONPATH=collection_root(), KVMHOST_USB_EVENTS=str(tmp_path / "events")), **extra))


def writers(tmp_path, count, each, backlog=1000, pause=0.0):
    """``count`` processes appending ``each`` events at once to the store in tmp_path/events, ``pause`` s apart."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / "events"), str(backlog), str(each), "w%d" % index, str(pause)], env=env(tmp_path)
        )
        for index in range(count)
    ]
    for process in processes:
        assert process.wait(60) == 0


def events_cli(tmp_path, *args, timeout=30):
    """``kvmhost-usb events ARGS`` as the runtime runs it (its main), in a process of its own."""
    command = [sys.executable, "-c", "import sys; from ansible_collections.kvmhost.usb.plugins.module_utils import _runtime;"
               " sys.exit(_runtime.main(sys.argv[1:]))", "events"] + list(args)
    return subprocess.run(command, capture_output=True, text=True, env=env(tmp_path), timeout=timeout, check=False)


def lines(text):
    return [json.loads(line) for line in text.splitlines()]


def test_writers_in_separate_processes_never_share_or_skip_a_number(tmp_path):
    writers(tmp_path, 4, 50)
    events, last = _events.Store(str(tmp_path / "events")).read()
    assert [event["seq"] for event in events] == list(range(1, 201))
    assert last == 200
    # Every writer's events are there, each in its own order.
    for index in range(4):
        ids = [event["device"]["id"] for event in events if event["device"]["id"].split(":")[2].startswith("w%d-" % index)]
        assert ids == ["0951:1666:w%d-%d" % (index, number) for number in range(50)]


def test_an_event_has_its_fields_and_the_time_in_utc_with_milliseconds(tmp_path):
    settings = tmp_path / "events.json"
    settings.write_text(json.dumps({"host": "kvm1"}))
    os.environ[_events.SETTINGS_ENV] = str(settings)
    try:
        event = _events.emit("attached", device={"id": "0951:1666", "attached_to": {}}, domain="vm1", by="converge",
                             store=_events.Store(str(tmp_path / "events")))
    finally:
        del os.environ[_events.SETTINGS_ENV]
    assert list(event)[:4] == ["seq", "time", "host", "kind"]
    assert event["host"] == "kvm1" and event["kind"] == "attached" and event["by"] == "converge" and event["domain"] == "vm1"
    # A device as usb_facts returns it, less where it is attached (a fact of the moment the event no longer tells).
    assert event["device"] == {"id": "0951:1666"}
    assert len(event["time"]) == len("2026-12-07T04:10:00.123+00:00") and event["time"].endswith("+00:00")
    with pytest.raises(ValueError):
        _events.emit("plugged", store=_events.Store(str(tmp_path / "events")))


def test_numbers_go_on_after_a_restart_and_after_the_state_file_is_lost(tmp_path):
    store = _events.Store(str(tmp_path / "events"))
    for _index in range(3):
        store.append({"kind": "added"})
    # A new process (a restarted agent) goes on where the last one stopped.
    writers(tmp_path, 1, 2)
    assert [event["seq"] for event in store.read()[0]] == [1, 2, 3, 4, 5]
    os.unlink(store.state_path)
    assert store.append({"kind": "removed"})["seq"] == 6


def test_compaction_keeps_the_last_n_and_numbers_go_on(tmp_path):
    writers(tmp_path, 2, 15, backlog=5)
    store = _events.Store(str(tmp_path / "events"), backlog=5)
    events, last = store.read()
    assert last == 30
    # Compacted to 5 when it passed 10, then appended to: between 5 and 10 kept, the last ones, in order.
    seqs = [event["seq"] for event in events]
    assert 5 <= len(seqs) <= 10 and seqs == list(range(31 - len(seqs), 31)), seqs
    assert store.append({"kind": "added"})["seq"] == 31


def test_a_writer_that_cannot_write_goes_on_and_says_so_once(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    said = []
    store = _events.Store(str(blocked / "events"))
    assert _events.emit("added", store=store, log=said.append) is None
    assert _events.emit("removed", store=store, log=said.append) is None
    assert len(said) == 1 and "cannot record an event" in said[0], said


def test_a_writer_does_not_wait_long_for_a_held_lock(tmp_path):
    store = _events.Store(str(tmp_path / "events"), lock_wait=0.2)
    os.makedirs(store.directory)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; d = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(d, fcntl.LOCK_EX);"
         " print('held', flush=True); time.sleep(30)", store.lock_path],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        said = []
        assert _events.emit("added", store=store, log=said.append) is None
        assert time.monotonic() - started < 1.0
        assert "stayed locked" in said[0]
    finally:
        holder.kill()
        holder.wait()


def test_the_cli_prints_the_kept_events_after_since_one_json_a_line(tmp_path):
    writers(tmp_path, 1, 5)
    every = events_cli(tmp_path)
    assert every.returncode == 0, every.stderr
    assert [event["seq"] for event in lines(every.stdout)] == [1, 2, 3, 4, 5]
    after = events_cli(tmp_path, "--since", "3")
    assert [event["seq"] for event in lines(after.stdout)] == [4, 5]
    assert events_cli(tmp_path, "--since", "5").stdout == ""


def test_since_older_than_the_oldest_kept_starts_at_the_oldest(tmp_path):
    writers(tmp_path, 1, 25, backlog=5)
    shown = events_cli(tmp_path, "--since", "2")
    assert shown.returncode == 0, shown.stderr
    seqs = [event["seq"] for event in lines(shown.stdout)]
    # The consumer sees the jump from 2 to the oldest kept.
    assert seqs[0] > 3 and seqs == list(range(seqs[0], 26))


def test_since_after_the_last_number_given_is_an_error(tmp_path):
    writers(tmp_path, 1, 3)
    shown = events_cli(tmp_path, "--since", "7")
    assert shown.returncode == 2 and shown.stdout == ""
    assert "--since 7 is after the last event this host recorded (3)" in shown.stderr
    # A host that never recorded an event: any number but 0 is from elsewhere.
    fresh = _events.Store(str(tmp_path / "none"))
    assert _events.main(["--since", "0"], out=io.StringIO(), store=fresh) == 0
    assert _events.main(["--since", "1"], out=io.StringIO(), store=fresh) == 2


@pytest.mark.parametrize("argument", ["--kinds=added,plugged", "--kinds=", "--since=-1", "--since=seven"])
def test_bad_arguments_exit_2_and_say_why(tmp_path, argument):
    shown = events_cli(tmp_path, argument)
    assert shown.returncode == 2 and shown.stdout == ""
    assert "kvmhost-usb events: error: argument" in shown.stderr
    if "plugged" in argument:
        assert "unknown kind(s) plugged; the kinds are added, removed" in shown.stderr


def test_kinds_filters_and_since_counts_every_kind(tmp_path):
    store = _events.Store(str(tmp_path / "events"))
    for kind in ("added", "attached", "removed", "detached", "added"):
        _events.emit(kind, store=store)
    out = io.StringIO()
    assert _events.main(["--kinds", "added,removed", "--since", "1"], out=out, store=store) == 0
    assert [(event["seq"], event["kind"]) for event in lines(out.getvalue())] == [(3, "removed"), (5, "added")]


def test_follow_sees_what_comes_after_it_started_none_twice_none_skipped_through_compactions(tmp_path):
    writers(tmp_path, 1, 3, backlog=20)
    command = [sys.executable, "-u", "-c", "import sys; from ansible_collections.kvmhost.usb.plugins.module_utils import _runtime;"
               " sys.exit(_runtime.main(sys.argv[1:]))", "events", "--since", "1", "--follow"]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    try:
        assert json.loads(follower.stdout.readline())["seq"] == 2
        assert json.loads(follower.stdout.readline())["seq"] == 3
        # Two writers at once, 60 events: the file is compacted twice (past 40, to 20) while it follows.
        writers(tmp_path, 2, 30, backlog=20, pause=0.05)
        seen = [json.loads(follower.stdout.readline())["seq"] for _index in range(60)]
    finally:
        follower.kill()
        follower.wait()
    # The follower reads every 0.2 s, while 40 events a second come: the 20 kept are always more than it has left to
    # read, so it saw each, once, in order.
    assert seen == list(range(4, 64))


def test_follow_ends_quietly_when_its_reader_goes_away(tmp_path):
    writers(tmp_path, 1, 1)
    command = [sys.executable, "-c", "import sys; from ansible_collections.kvmhost.usb.plugins.module_utils import _events;"
               " sys.exit(_events.main(sys.argv[1:]))", "--follow"]
    follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    assert json.loads(follower.stdout.readline())["seq"] == 1
    follower.stdout.close()
    writers(tmp_path, 1, 1)
    assert follower.wait(10) == 0
    assert follower.stderr.read() == ""
