"""A stand-in for ssh that plays the remote side of ``kvmhost-usb`` and records its calls: the unit tier has no KVM
host that a real ssh client could reach, so the tests of the usb_events event source put this first on PATH as
``ssh`` and script what each host answers.

It keeps its state in $SSH_STANDIN_DIR: ``hosts.json`` (written by the test), ``calls.jsonl`` (one call a line:
``{"host": destination, "argv": [...]}``) and a counter of ``--follow`` sessions per host.

hosts.json maps a destination (the word after ``--``) to its script:

* ``version``: ``{"rc", "stdout", "stderr"}`` for ``kvmhost-usb version`` (default: rc 0, a version line);
* ``events``: the same for ``kvmhost-usb events`` without ``--follow`` (default: rc 0, no event);
* ``sessions``: one entry per ``kvmhost-usb events --follow`` call, in order: ``{"lines", "rc", "stderr", "pause"}``.
  A line that is a dict is printed as JSON, a string as it is; ``pause`` seconds pass between lines. A call past the
  last entry, or an entry with ``"hang": true`` after its lines, stays open printing nothing (a quiet host) until it
  is ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time


def main(argv):
    directory = os.environ["SSH_STANDIN_DIR"]
    split = argv.index("--")
    host, command = argv[split + 1], argv[split + 2:]
    with open(os.path.join(directory, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(directory, "calls.jsonl"), "a") as calls:
            calls.write(json.dumps({"host": host, "argv": argv}) + "\n")
        with open(os.path.join(directory, "hosts.json")) as handle:
            script = json.load(handle).get(host)
        session = None
        if script is not None and command[:2] == ["kvmhost-usb", "events"] and "--follow" in command:
            counter = os.path.join(directory, "%s.sessions" % host)
            count = int(open(counter).read()) if os.path.exists(counter) else 0
            with open(counter, "w") as handle:
                handle.write(str(count + 1))
            sessions = script.get("sessions", [])
            session = sessions[count] if count < len(sessions) else {"hang": True}
    if script is None:
        sys.stderr.write("ssh: Could not resolve hostname %s: Name or service not known\n" % host)
        return 255
    if command == ["kvmhost-usb", "version"]:
        return answer(script.get("version", {"rc": 0, "stdout": "kvmhost-usb 0.2.0 (build 1f17e9820ba6)\n"}))
    if command == ["kvmhost-usb", "events"]:
        return answer(script.get("events", {"rc": 0}))
    if session is None:
        sys.stderr.write("bash: line 1: %s: command not found\n" % command[0])
        return 127
    for line in session.get("lines", []):
        sys.stdout.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
        sys.stdout.flush()
        time.sleep(session.get("pause", 0))
    if session.get("hang"):
        # Until it is ended, or its parent is gone (a real ssh would notice at its next write), two minutes at most.
        parent, deadline = os.getppid(), time.monotonic() + 120
        while os.getppid() == parent and time.monotonic() < deadline:
            time.sleep(0.2)
    sys.stderr.write(session.get("stderr", ""))
    return session.get("rc", 255)


def answer(reply):
    sys.stdout.write(reply.get("stdout", ""))
    sys.stderr.write(reply.get("stderr", ""))
    return reply.get("rc", 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
