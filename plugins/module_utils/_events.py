# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host's events: what happened to its USB devices, domains, exports and link, one JSON object each, numbered.

The agent, the exporter and the modules that change domains are separate processes; each appends its events to one
store, a file in /var/lib/kvmhost-usb (``events.jsonl``), under an fcntl lock (``events.lock``). The last number given
is kept beside it (``events.state``, written before the event, so a number is never given twice, also across restarts
and compactions: a crash between the two skips one). The store keeps the last ``backlog`` events (1000 unless
/etc/kvmhost-usb/events.json says otherwise); past twice as many it is compacted, under the lock, to the last
``backlog``. Writing an event never fails its writer and never waits long for the lock: a failure is logged once and
the event dropped.

Every event has ``seq`` (per host, strictly increasing), ``time`` (ISO 8601, UTC, milliseconds), ``host`` (the name
events.json gives, else the host name) and ``kind`` (``KINDS``), and as it applies ``device`` (a device as usb_facts
returns it, without ``attached_to``), ``domain`` (its name) and the fields of its kind (docs/events.md).

``kvmhost-usb events`` (``main``) prints them: ``--since SEQ`` the ones after SEQ, ``--follow`` and those to come,
``--kinds`` only these kinds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import EventsError

KINDS = ("added", "removed", "attached", "detached", "missing", "given_back", "refused", "link_down", "link_up", "migrated")
# Who attached or detached a device: the agent's pass, a converge (usb_passthrough, usb_attach, usb_detach), or
# something else (virsh, another tool) that libvirt reported.
BY = ("agent", "converge", "other")

EVENTS_DIR = "/var/lib/kvmhost-usb"
# Tests keep the store in a directory of their own (as KVMHOST_USB_IMPORTS does the import records).
EVENTS_DIR_ENV = "KVMHOST_USB_EVENTS"
SETTINGS_FILE = "/etc/kvmhost-usb/events.json"
SETTINGS_ENV = "KVMHOST_USB_EVENTS_SETTINGS"
EVENTS_FILE = "events.jsonl"
STATE_FILE = "events.state"
LOCK_FILE = "events.lock"
BACKLOG = 1000
# The longest a writer waits for the lock before it drops its event (a reader holds it for one read of the file).
LOCK_WAIT = 1.0
# How often ``--follow`` looks at the store (one stat and, when it changed, one small read).
POLL = 0.2


def events_dir() -> str:
    return os.environ.get(EVENTS_DIR_ENV) or EVENTS_DIR


def read_settings() -> dict:
    """``{"backlog": N, "host": name}`` as usb_runtime wrote them; {} without the file."""
    try:
        with open(os.environ.get(SETTINGS_ENV) or SETTINGS_FILE) as handle:
            settings = json.load(handle)
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def host_name(settings: dict | None = None) -> str:
    settings = read_settings() if settings is None else settings
    return str(settings.get("host") or socket.gethostname())


def now_text(when: float | None = None) -> str:
    """ISO 8601 in UTC with milliseconds and the offset: 2026-12-07T04:10:00.123+00:00."""
    moment = datetime.datetime.fromtimestamp(time.time() if when is None else when, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def _backlog(value) -> int:
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        return BACKLOG


class Store:
    """The events file of a host, its state (the last number given, the lines kept) and its lock."""

    def __init__(self, directory: str | None = None, backlog: int | None = None, lock_wait: float = LOCK_WAIT) -> None:
        self.directory = directory or events_dir()
        self.backlog = _backlog(backlog if backlog is not None else read_settings().get("backlog", BACKLOG))
        self.lock_wait = lock_wait
        self.path = os.path.join(self.directory, EVENTS_FILE)
        self.state_path = os.path.join(self.directory, STATE_FILE)
        self.lock_path = os.path.join(self.directory, LOCK_FILE)

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True):
        if exclusive:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_wait
            operation = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            while True:
                try:
                    fcntl.flock(descriptor, operation)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise EventsError("the events store %s stayed locked for %g s" % (self.directory, self.lock_wait))
                    time.sleep(0.005)
            yield
        finally:
            os.close(descriptor)

    # The state: read without the lock too (it is replaced whole, by rename)

    def state(self) -> dict:
        """``{"last": the last number given, "lines": events in the file}``; from the file itself when the state is
        missing or unreadable (its last event's number, its line count)."""
        try:
            with open(self.state_path) as handle:
                state = json.load(handle)
            return {"last": int(state["last"]), "lines": int(state["lines"])}
        except (OSError, ValueError, TypeError, KeyError):
            pass
        events = self._read_file()
        return {"last": max([event["seq"] for event in events] or [0]), "lines": len(events)}

    def last(self) -> int:
        """The last number the store gave (0 when it never gave one)."""
        return self.state()["last"]

    def _write_state(self, state: dict) -> None:
        temporary = self.state_path + ".new"
        with open(temporary, "w") as handle:
            json.dump(state, handle)
        os.replace(temporary, self.state_path)

    def _read_file(self) -> list:
        try:
            with open(self.path) as handle:
                lines = handle.readlines()
        except FileNotFoundError:
            return []
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: not an event
            if isinstance(event, dict) and isinstance(event.get("seq"), int):
                events.append(event)
        return events

    # Writing

    def append(self, event: dict) -> dict:
        """Number the event, append it, compact the file past twice the backlog; the event with its ``seq``."""
        with self.locked():
            state = self.state()
            seq = state["last"] + 1
            event = dict(seq=seq, **dict((key, value) for key, value in event.items() if key != "seq"))
            line = json.dumps(event, separators=(",", ":")) + "\n"
            lines = state["lines"] + 1
            # The number first: a crash before the line skips it, never gives it again.
            self._write_state({"last": seq, "lines": lines})
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode())
            finally:
                os.close(descriptor)
            if lines > 2 * self.backlog:
                self._compact(seq)
        return event

    def _compact(self, last: int) -> None:
        kept = self._read_file()[-self.backlog:]
        temporary = self.path + ".new"
        with open(temporary, "w") as handle:
            handle.writelines(json.dumps(event, separators=(",", ":")) + "\n" for event in kept)
        os.replace(temporary, self.path)
        self._write_state({"last": last, "lines": len(kept)})

    # Reading

    def read(self, since: int | None = None) -> tuple[list, int]:
        """``(events, last)``: the kept events with a number above ``since`` (all kept without it), in order, and the
        last number the store gave."""
        if not os.path.isdir(self.directory):
            return [], 0
        with self.locked(exclusive=False):
            events = self._read_file()
            last = self.state()["last"]
        return [event for event in events if since is None or event["seq"] > since], last


_STORE = None
_LOGGED = set()


def default_store() -> Store:
    global _STORE  # pylint: disable=global-statement
    if _STORE is None or _STORE.directory != events_dir():
        _STORE = Store()
    return _STORE


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def emit(kind: str, device: dict | None = None, domain: str | None = None, store: Store | None = None, log=None, **fields) -> dict | None:
    """Append an event of ``kind`` (one of KINDS) to the host's store: the event as kept, or None when it could not be
    written (said once per reason through ``log``, stderr by default; the caller goes on either way)."""
    if kind not in KINDS:
        raise ValueError("unknown event kind %r (one of %s)" % (kind, ", ".join(KINDS)))
    event = {"time": now_text(), "host": None, "kind": kind}
    if device is not None:
        event["device"] = dict((key, value) for key, value in device.items() if key not in ("attached_to", "is_root_hub", "parent_port"))
    if domain is not None:
        event["domain"] = domain
    event.update(fields)
    try:
        event["host"] = host_name()
        return (store or default_store()).append(event)
    except (OSError, ValueError, TypeError, EventsError) as error:
        message = "cannot record an event in %s: %s" % ((store or default_store()).directory, error)
        if message not in _LOGGED:
            _LOGGED.add(message)
            (log or _stderr)(message + " (said once; events go unrecorded meanwhile)")
        return None


# ``kvmhost-usb events``

def _kinds(text: str) -> list:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError("unknown kind(s) %s; the kinds are %s" % (", ".join(unknown) or "(none)", ", ".join(KINDS)))
    return kinds


def _since(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError("%r is not an event number (0 or more)" % text)
    return value


def main(argv: list | None = None, out=None, poll: float = POLL, store: Store | None = None) -> int:
    """``kvmhost-usb events [--since SEQ] [--follow] [--kinds k1,k2]``: one JSON object a line, each flushed. Exit 2 for
    a bad argument or a SEQ after the last number the store gave (a consumer from another install), 1 when the store
    cannot be read, 0 otherwise (also when the reader of --follow goes away)."""
    parser = argparse.ArgumentParser(prog="kvmhost-usb events", description="print this host's events, one JSON object a line")
    parser.add_argument("--since", type=_since, metavar="SEQ", help="only the events after this number (default: every event kept)")
    parser.add_argument("--follow", action="store_true", help="then wait for new events and print each as it comes")
    parser.add_argument("--kinds", type=_kinds, metavar="K1,K2", help="only these kinds (%s)" % ", ".join(KINDS))
    args = parser.parse_args(argv)
    out = out or sys.stdout
    store = store or Store()
    try:
        events, last = store.read(args.since)
        if args.since is not None and args.since > last:
            sys.stderr.write(
                "kvmhost-usb events: --since %d is after the last event this host recorded (%d): the store is not the one"
                " that number came from (reinstalled or reset); start again without --since\n" % (args.since, last)
            )
            return 2
        seen = args.since or 0
        while True:
            for event in events:
                if event["seq"] <= seen:
                    continue
                seen = event["seq"]
                if args.kinds is None or event.get("kind") in args.kinds:
                    out.write(json.dumps(event, separators=(",", ":")) + "\n")
                    out.flush()
            seen = max(seen, last)
            if not args.follow:
                return 0
            while True:
                time.sleep(poll)
                now = store.last()
                if now < seen:
                    sys.stderr.write("kvmhost-usb events: the store went back from %d to %d (reset); stopping\n" % (seen, now))
                    return 2
                if now > seen:
                    break
            events, last = store.read(seen)
    except BrokenPipeError:
        # The reader went away: nothing more to say, and nothing for the interpreter to flush at exit either.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        return 0
    except KeyboardInterrupt:
        return 0
    except (OSError, EventsError) as error:
        sys.stderr.write("kvmhost-usb events: cannot read %s: %s\n" % (store.directory, error))
        return 1
