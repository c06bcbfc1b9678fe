# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The reattach agent: keeps every domain's declared USB devices (its intent metadata) attached
across unplug, replug and domain start, on udev and libvirt events.

``reconcile`` is one pass: it reads the host's devices and every domain with the collection's
intent, plans with the same planner as usb_passthrough (``_passthrough.Planner``, its recorded intent as the
declaration, on the one host model ``_host.HostModel``), and carries the plan out:

* a declared device that is present: attached live to the running domain that declares it, and the
  hostdev of each configuration re-bound to its new address when a replug changed it;
* a declared device that is absent: its stale live hostdev removed, the intent and the persistent
  (``startupPolicy='optional'``) hostdev kept, so the domain still starts and gets it back later.

A device another KVM host exports to this one (an intent entry with ``host`` and ``link_address``) is imported over
USB/IP first (``_crosshost.Imports``), so that it is a local device when the domain is planned; while
the import fails (the exporting host, its exporter or the link down) passes come sooner, with backoff, and the failure
is logged once; an import lost (the device replugged over there, the connection broken) is logged and made again.
While the exporter answers that it has the device away (not plugged in, in use, not available), the agent also watches
for it (``wire.open_watch``, one connection per import away, in the event loop): the exporter says the moment it is
back, and a pass comes at once. The timed passes go on beside it, and are all there is with an exporter that does not
know the watch (it closes the connection).

Domains without the intent are never touched. ``Agent`` runs the passes: at start, at once on a udev
(usb_device add/remove) or libvirt (domain started) event that follows a quiet moment, after a burst of
such events has been quiet for a moment, on a periodic timer, and at once whenever it (re)connects to
libvirt. While libvirt does not answer (down
at start, or restarted) it retries every second or two; what udev reported meanwhile is caught up by
the pass that follows the reconnect. A pass killed half-way leaves nothing the next one cannot finish:
hostdevs change before the intent that records them, and the planner recognises either half. It prints
one line per action (reconnects included); under systemd the journal keeps them.

It records the host's events (``_events``): a device added or removed (udev), attached or detached by its pass (or
by something else, when libvirt reports a USB hostdev added to or removed from a domain that neither the agent nor a
converge announced within ``ANNOUNCED_WITHIN`` seconds), a declared device missing longer than ``--missing-after``
seconds (once per absence), a replug it repaired (``given_back``, with the seconds from the removal), an import
refused (once per failure message, as it logs them), and the WireGuard peers of a linked host going down and up (their
latest handshake, every ``LINK_CHECK`` seconds).

Run it as ``python3 -m ansible_collections.kvmhost.usb.plugins.module_utils._agent`` (the role
``kvmhost.usb.passthrough`` installs it as the service ``kvmhost-usb-agent``).
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time

from dataclasses import dataclass, field

from ansible_collections.kvmhost.usb.plugins.module_utils import _crosshost, _events, _host, _libvirt, _link, _lock, _passthrough, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LibvirtError, PassthroughError, UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import wire

LIVE = _host.LIVE
PERSISTENT = _host.PERSISTENT


@dataclass
class Action:
    verb: str
    device_id: str
    domain: str
    scope: str
    hostdev: dict
    device: dict | None = None  # the device planned (an absent one's stand-in included)

    def line(self):
        hostdev = self.hostdev
        if hostdev.get("bus") is not None and hostdev.get("device") is not None:
            where = "address %03d:%03d" % (hostdev["bus"], hostdev["device"])
        else:
            where = "by vendor:product"
        if self.verb == "attached":
            return "attached %s to %s (%s, %s)" % (self.device_id, self.domain, self.scope, where)
        if self.verb == "re-bound":
            return "re-bound %s in %s (%s, %s)" % (self.device_id, self.domain, self.scope, where)
        return "removed stale %s from %s (%s, %s); intent kept" % (self.device_id, self.domain, self.scope, where)


@dataclass
class PassReport:
    """What a pass did beyond its lines, for the agent's events: the actions carried out and the host as it read it."""

    actions: list = field(default_factory=list)
    model: object = None


@dataclass
class Watch:
    """A watch the agent holds open on an exporter (``wire.open_watch``) for an import away."""

    sock: socket.socket
    handle: int  # its handle in the event loop
    away: dict  # what ``Imports.away`` says of the import
    opened: float


def declares(domain):
    """Whether the domain carries the collection's intent in any configuration."""
    return any(config.intent for config in domain.configs.values())


def _live_holders(model, device, domain):
    return [holder.name for holder, scopes in model.claimants(device, exclude=domain) if LIVE in scopes]


def plan_domain(planner, domain):
    """Plan one declared domain, its recorded intent as the declaration: ``(actions, skipped)``, the steps
    in ``planner.steps``. ``skipped`` are messages about declared devices another running domain holds."""
    model = planner.model
    actions = []
    skipped = []
    for scope in (LIVE, PERSISTENT):
        config = domain.configs.get(scope)
        if config is None:
            continue
        for entry in list(config.intent):
            device = model.find(entry)
            if device is None:
                device = _host.absent_device(entry["id"])
            elif scope == LIVE and _live_holders(model, device, domain):
                skipped.append("not attaching %s to %s: held by %s" % (entry["id"], domain.name, ", ".join(_live_holders(model, device, domain))))
                continue
            before = len(planner.steps)
            planner.plan_attach(domain, [scope], entry["selector"], device)
            actions.extend(_actions(planner.steps[before:], entry["id"], device))
    return actions, skipped


def _actions(steps, device_id, device=None):
    attached = [step for step in steps if step.action == "attach"]
    if attached:
        step = attached[-1]
        verb = "attached" if step.scope == LIVE or len(steps) == 1 else "re-bound"
        return [Action(verb, device_id, step.domain.name, step.scope, step.hostdev, device)]
    return [Action("removed stale", device_id, step.domain.name, step.scope, step.hostdev, device) for step in steps if step.action == "detach"]


# Seconds an import may take until the device is a local USB device (several under TCG).
IMPORT_TIMEOUT = 20.0


def reconcile(conn, uri="qemu:///system", check_mode=False, importer=None, report=None):
    """One pass over every declared domain; the lines to log, one per action (or refusal).

    Devices another host exports to this one are imported first (``importer``, a ``_crosshost.Imports`` the agent keeps
    across passes); then each domain is planned and carried out on its own, so a domain libvirt refuses does not hold
    up the others. What it attaches and detaches is announced in the events as the agent's; ``report`` (a
    ``PassReport``) gets the actions carried out and the host model."""
    planner = _passthrough.Planner(conn, uri, check_mode)
    planner.by = "agent"
    lines = []
    with _lock.maybe_lock(check_mode):
        # The domains first: what they import from other hosts is imported before the devices are read, once.
        planner.model = _host.HostModel([], [])
        planner.load_domains()
        domains = planner.model.domains
        # With no remote entry left, an importer that held or failed imports forgets them (and its watches end).
        if _crosshost.remote_entries(planner.model) or (importer is not None and (importer.records or importer.pending)):
            importer = importer if importer is not None else _crosshost.Imports(check_mode, IMPORT_TIMEOUT)
            planner.imports = importer
            lines.extend(importer.keep(planner.model))
        planner.enumerate()
        planner.model.domains = domains
        if report is not None:
            report.model = planner.model
        for domain in planner.model.domains:
            if not declares(domain):
                continue
            planner.steps = []
            planner.touched = []
            actions, skipped = plan_domain(planner, domain)
            lines.extend(skipped)
            if not planner.steps and not planner.touched:
                continue
            try:
                planner.execute()
            except PassthroughError as error:
                lines.append("failed to converge %s: %s" % (domain.name, error))
                continue
            finally:
                lines.extend(planner.warnings)
                planner.warnings = []
            if planner.touched and not actions and not check_mode:
                lines.append("updated the intent of %s" % domain.name)
            if report is not None and not check_mode:
                report.actions.extend(actions)
            lines.extend(("would have " if check_mode else "") + action.line() for action in actions)
    return lines


CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by the client"}


class Debouncer:
    """Coalesces a burst of events. An event that none came for ``quiet`` seconds before is due at once, so
    that a single plug or unplug is acted on without delay. The events of a burst, those that follow another
    closely or came during a pass, wait until none came for ``quiet`` seconds, or ``longest`` seconds after the
    first of them in a burst that does not stop."""

    def __init__(self, quiet=0.5, longest=3.0):
        self.quiet = quiet
        self.longest = longest
        self.first = None
        self.last = None
        self.previous = None
        self.leading = False

    @property
    def pending(self):
        return self.first is not None

    def poke(self, now, during_pass=False):
        if self.first is None:
            self.first = now
            self.leading = not during_pass and (self.previous is None or now - self.previous >= self.quiet)
        self.last = now
        self.previous = now

    def due(self, now):
        if self.first is None:
            return False
        return self.leading or now - self.last >= self.quiet or now - self.first >= self.longest

    def clear(self):
        self.first = None
        self.last = None
        self.leading = False


TICK_MS = 100
# While libvirt does not answer: retry after these many seconds, then every last one of them.
RETRY_DELAYS = (0.5, 1.0, 2.0)
# While an import fails: the next pass after these many seconds, then every last one of them.
IMPORT_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0)
# Seconds to open a watch: the exporter has just answered the import's request.
WATCH_TIMEOUT = 5.0
# A watch answered "not yet" after being held this long at least is opened again at once; one answered sooner waits for
# the next timed pass, so that no exporter can make the agent loop.
WATCH_HELD_LEAST = 10.0
# A USB hostdev libvirt reports added to or removed from a domain is someone else's doing ("other") unless the agent or
# a converge announced it within this many seconds of it.
ANNOUNCED_WITHIN = 5.0
# A declared device absent this long is ``missing`` (--missing-after).
MISSING_AFTER = 300.0
# How often a linked host's WireGuard peers are looked at, and how old their latest handshake may be before a peer is
# down (WireGuard's reject-after time: no packet of an older session is taken).
LINK_CHECK = 15.0
LINK_DOWN_AFTER = 180


class Agent:
    """udev monitor and libvirt events in one process, on libvirt's default event loop."""

    def __init__(self, uri, quiet=0.5, longest=3.0, period=60.0, out=None, clock=time.monotonic, missing_after=MISSING_AFTER, store=None,
                 link_check=LINK_CHECK, wall=time.time):
        self.uri = uri
        self.period = period
        self.out = out or sys.stdout
        self.clock = clock
        self.debouncer = Debouncer(quiet, longest)
        self.conn = None
        self.skipped = []
        self.monitor = None
        self.tick = None
        self.retry = None
        self.retries = 0
        self.lost = None
        self.down_since = None
        self.importer = _crosshost.Imports(timeout=IMPORT_TIMEOUT)
        self.import_retry = None
        self.import_retries = 0
        self.watches = {}  # selector key -> Watch
        self.unwatched = set()  # the keys whose exporter refused the watch, until they are no longer away
        # Events
        self.store = store or _events.Store()
        self.wall = wall
        self.missing_after = missing_after
        self.link_check = link_check
        self.known = {}  # sys_path -> device, as udev last said
        self.removed = {}  # device id -> when it was removed, until a pass gives it back or finds it needs nothing
        self.last_seen = {}  # device id -> the device as it was when removed
        self.absent = {}  # (domain name, device id) -> since when a declared device is absent
        self.said_missing = set()
        self.missing_timer = None
        self.aliases = {}  # (domain uuid, alias) -> the USB hostdev of a running domain
        self.unannounced = []  # hostdevs libvirt reported added or removed, until their announcement is looked for
        self.announce_timer = None
        self.link_up = {}  # a peer's public key -> whether it was up at the last look
        self.link_error = None

    def log(self, line):
        self.out.write(line + "\n")
        self.out.flush()

    def emit(self, kind, **fields):
        return _events.emit(kind, store=self.store, log=self.log, **fields)

    # Events

    def poke(self, during_pass=False):
        now = self.clock()
        self.debouncer.poke(now, during_pass)
        _libvirt.libvirt.virEventUpdateTimeout(self.tick, 0 if self.debouncer.due(now) else TICK_MS)

    def on_udev(self, _watch, _fd, _events, _opaque):
        self.read_udev()

    def read_udev(self, during_pass=False):
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                return
            if device.action in ("add", "remove"):
                self.device_event(device.action, device)
                self.poke(during_pass)

    # Devices plugged in and out

    def remember_devices(self, context=None):
        self.known = dict((device["sys_path"], device) for device in _usb.enumerate_devices(context))

    def device_event(self, action, device):
        """udev's add or remove of a USB device (a pyudev device): ``added`` or ``removed``, for a device that is no hub,
        as usb_facts shows it (a removed one as it was)."""
        if action == "remove":
            known = self.known.pop(device.sys_path, None)
            if known is None or known["is_hub"] or known["is_root_hub"]:
                return
            self.removed[known["id"]] = self.clock()
            self.last_seen[known["id"]] = _usb.public_view(known)
            self.emit("removed", device=_usb.public_view(known))
            return
        try:
            read = _usb.read_device(device)
        except (OSError, ValueError) as error:
            self.log("cannot read %s, just added: %s" % (device.sys_path, error))
            return
        self.known[read["sys_path"]] = read
        _usb.assign_ids(list(self.known.values()))
        if not (read["is_hub"] or read["is_root_hub"]):
            self.emit("added", device=_usb.public_view(read))

    def after_pass(self, report):
        """The events of a pass beyond its attaches and detaches (the planner announced those): replugs given back,
        imports refused, declared devices missing; and the USB hostdevs of the running domains, by alias."""
        now = self.clock()
        for action in report.actions:
            if action.verb in ("attached", "re-bound") and action.device_id in self.removed:
                seconds = now - self.removed.pop(action.device_id)
                device = _usb.public_view(action.device) if action.device else self.last_seen.get(action.device_id)
                self.emit("given_back", device=device, domain=action.domain, seconds=round(seconds, 3))
        for refusal in self.importer.refused:
            self.emit("refused", peer=refusal["peer"], reason=refusal["reason"], side="importer", domain=refusal["domain"], device={"id": refusal["id"]})
        self.importer.refused = []
        model = report.model
        if model is None:
            return
        present = set(device["id"] for device in model.devices)
        for device_id in [device_id for device_id in self.removed if device_id in present]:
            del self.removed[device_id]  # back, and nothing to repair
        self.aliases = dict(
            ((domain.uuid, hostdev["alias"]), hostdev)
            for domain in model.domains if LIVE in domain.configs
            for hostdev in domain.configs[LIVE].hostdevs if hostdev.get("alias")
        )
        self.track_missing(model, present)

    def track_missing(self, model, present):
        declared = set()
        for domain in model.domains:
            if not declares(domain):
                continue
            for config in domain.configs.values():
                for entry in config.intent:
                    if model.find(entry) is None:
                        declared.add((domain.name, entry["id"]))
        for key in [key for key in self.absent if key not in declared]:
            del self.absent[key]
            self.said_missing.discard(key)
        for key in declared:
            self.absent.setdefault(key, self.removed.get(key[1], self.clock()))
        for device_id in [device_id for device_id in self.last_seen if device_id in present]:
            del self.last_seen[device_id]
        self.check_missing()

    def check_missing(self, *_args):
        """``missing`` for each declared device absent ``missing_after`` seconds, once per absence; the next look
        scheduled for the next one due."""
        now = self.clock()
        due = None
        for key, since in sorted(self.absent.items()):
            if key in self.said_missing:
                continue
            if now - since < self.missing_after:
                due = min(due if due is not None else self.missing_after, since + self.missing_after - now)
                continue
            self.said_missing.add(key)
            domain, device_id = key
            device = self.last_seen.get(device_id) or _host.absent_device(device_id)
            self.emit("missing", device=device, domain=domain, seconds=round(now - since, 3))
        if self.missing_timer is not None:
            _libvirt.libvirt.virEventUpdateTimeout(self.missing_timer, -1 if due is None else max(1, int(due * 1000)))

    # USB hostdevs added or removed by someone else

    def on_device_added(self, _conn, domain, alias, _opaque):
        try:
            hostdevs = [hostdev for hostdev in _libvirt.usb_hostdevs(domain.XMLDesc(0)) if hostdev.get("alias") == alias]
            uuid, name = domain.UUIDString(), domain.name()
        except _libvirt.libvirt.libvirtError:
            return
        if hostdevs:
            self.aliases[(uuid, alias)] = hostdevs[0]
            self.unannounce("attached", name, hostdevs[0])

    def on_device_removed(self, _conn, domain, alias, _opaque):
        try:
            uuid, name = domain.UUIDString(), domain.name()
        except _libvirt.libvirt.libvirtError:
            return
        hostdev = self.aliases.pop((uuid, alias), None)
        if hostdev is not None:
            self.unannounce("detached", name, hostdev)

    def unannounce(self, kind, domain, hostdev):
        devices = [device for device in self.known.values() if _libvirt.hostdev_matches(hostdev, device)]
        self.unannounced.append({"kind": kind, "domain": domain, "hostdev": hostdev, "device": devices[0] if len(devices) == 1 else None,
                                 "seen": self.clock(), "at": self.wall()})
        if self.announce_timer is not None:
            _libvirt.libvirt.virEventUpdateTimeout(self.announce_timer, 1000)

    def check_announced(self, *_args):
        """``attached``/``detached`` by "other" for the hostdevs libvirt reported that no event announced within
        ANNOUNCED_WITHIN seconds of it."""
        now = self.clock()
        due = [item for item in self.unannounced if now - item["seen"] >= ANNOUNCED_WITHIN]
        self.unannounced = [item for item in self.unannounced if item not in due]
        if due:
            try:
                events, _last = self.store.read()
            except (OSError, _events.EventsError) as error:
                self.log("cannot read the events to tell who changed a domain: %s" % error)
                events = []
            for item in due:
                if not any(self._announces(event, item) for event in events):
                    device = item["device"]
                    # A hostdev that designates no one device: as usb_facts shows a domain's hostdevs.
                    if device:
                        what = {"device": _usb.public_view(device)}
                    else:
                        what = {"hostdev": _host.HostModel(list(self.known.values()), []).hostdev_view(item["hostdev"])}
                    self.emit(item["kind"], domain=item["domain"], by="other", **what)
        if self.announce_timer is not None:
            _libvirt.libvirt.virEventUpdateTimeout(self.announce_timer, 1000 if self.unannounced else -1)

    @staticmethod
    def _announces(event, item):
        if event.get("kind") != item["kind"] or event.get("domain") != item["domain"] or event.get("by") not in ("agent", "converge"):
            return False
        if item["device"] is not None and (event.get("device") or {}).get("id") not in (None, item["device"]["id"]):
            return False
        try:
            when = datetime.datetime.fromisoformat(event["time"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return False
        return abs(when - item["at"]) <= ANNOUNCED_WITHIN

    # The link

    def check_link(self, *_args):
        """``link_down``/``link_up`` when a WireGuard peer's state changed since the last look (at the first look, only
        when it is down): down when its latest handshake is older than LINK_DOWN_AFTER seconds, or never was."""
        peers = (_link.read_settings() or {}).get("peers") or []
        if not peers:
            self.link_up = {}
            return
        try:
            handshakes = _link.handshakes()
        except _link.LinkError as error:
            if str(error) != self.link_error:
                self.log("cannot look at the link's peers: %s" % error)
            self.link_error = str(error)
            return
        self.link_error = None
        now = self.wall()
        for peer in peers:
            last = handshakes.get(peer["public_key"], 0)
            up = bool(last) and now - last <= LINK_DOWN_AFTER
            before = self.link_up.get(peer["public_key"])
            self.link_up[peer["public_key"]] = up
            if before == up or (before is None and up):
                continue
            self.log("the link to %s (%s) is %s" % (peer["name"], peer["tunnel_address"], "up" if up else "down"))
            self.emit(
                "link_up" if up else "link_down", peer=peer["tunnel_address"], name=peer["name"], endpoint=peer.get("endpoint"),
                handshake=_events.now_text(last) if last else None,
            )

    def on_lifecycle(self, _conn, _domain, event, _detail, _opaque):
        if event == _libvirt.libvirt.VIR_DOMAIN_EVENT_STARTED:
            self.poke()

    def on_close(self, _conn, reason, _opaque):
        self.disconnected("lost the connection to %s (%s); reconnecting" % (self.uri, CLOSE_REASONS.get(reason, "reason %d" % reason)))

    def on_retry(self, _timer, _opaque):
        self.pass_()

    def on_tick(self, _timer, _opaque):
        if self.debouncer.due(self.clock()):
            self.debouncer.clear()
            self.pass_()
            # What udev reported during the pass is part of a burst: it waits for a quiet moment.
            self.read_udev(during_pass=True)
        _libvirt.libvirt.virEventUpdateTimeout(self.tick, TICK_MS if self.debouncer.pending else -1)

    def on_period(self, _timer, _opaque):
        self.pass_()

    # The connection

    def connect(self):
        """Open the connection; on success the caller makes a pass at once, on failure a retry is scheduled."""
        libvirt = _libvirt.libvirt
        self.forget_lost()
        conn = None
        try:
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self.on_device_added, None)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self.on_device_removed, None)
            conn.registerCloseCallback(self.on_close, None)
        except libvirt.libvirtError as error:
            self.lost = conn
            if self.down_since is None:
                self.down_since = self.clock()
                # Once per outage; the retries that follow are not logged.
                self.log("cannot connect to %s: %s; retrying every %g s" % (self.uri, _libvirt.error_message(error), RETRY_DELAYS[-1]))
            self.schedule_retry()
            return None
        if self.down_since is not None:
            self.log("connected to %s again after %.1f s; catching up" % (self.uri, self.clock() - self.down_since))
        self.down_since = None
        self.retries = 0
        _libvirt.libvirt.virEventUpdateTimeout(self.retry, -1)
        return conn

    def disconnected(self, line):
        """The connection broke: log it once, drop it, and reconnect soon (the reconnect makes a pass)."""
        if self.conn is None:
            return
        self.log(line)
        self.lost = self.conn
        self.conn = None
        self.down_since = self.clock()
        self.retries = 0
        self.schedule_retry()

    def schedule_retry(self):
        delay = RETRY_DELAYS[min(self.retries, len(RETRY_DELAYS) - 1)]
        self.retries += 1
        _libvirt.libvirt.virEventUpdateTimeout(self.retry, int(delay * 1000))

    def forget_lost(self):
        lost, self.lost = self.lost, None
        if lost is None:
            return
        for release in (lost.unregisterCloseCallback, lost.close):
            try:
                release()
            except _libvirt.libvirt.libvirtError:
                pass

    # Passes

    def pass_(self, skip=()):
        """One pass (``reconcile``), the next ones scheduled; ``skip``: imports whose watch just said they are back,
        watched again by a later pass only, so that an import that still fails never loops on its watch."""
        if self.conn is None:
            self.conn = self.connect()
            if self.conn is None:
                return
        report = PassReport()
        try:
            lines = reconcile(self.conn, self.uri, importer=self.importer, report=report)
        except (_libvirt.libvirt.libvirtError, PassthroughError, OSError) as error:
            message = _libvirt.error_message(error) if isinstance(error, _libvirt.libvirt.libvirtError) else str(error)
            if not self.alive():
                # The pass that follows the reconnect does what this one could not.
                self.disconnected("lost the connection to %s during a pass (%s); reconnecting" % (self.uri, message))
            else:
                self.log("reconcile failed: %s" % message)
            return
        self.after_pass(report)
        self.schedule_import_retry()
        self.watch_away(skip)
        skipped = [line for line in lines if line.startswith("not attaching")]
        for line in lines:
            # A device another domain holds is reported once, not on every pass.
            if line not in self.skipped:
                self.log(line)
        self.skipped = skipped

    def schedule_import_retry(self):
        """While an import fails (the exporting host or the link down), passes come sooner than the period."""
        if not self.importer.pending:
            self.import_retries = 0
            _libvirt.libvirt.virEventUpdateTimeout(self.import_retry, -1)
            return
        delay = IMPORT_RETRY_DELAYS[min(self.import_retries, len(IMPORT_RETRY_DELAYS) - 1)]
        self.import_retries += 1
        _libvirt.libvirt.virEventUpdateTimeout(self.import_retry, int(delay * 1000))

    def on_import_retry(self, _timer, _opaque):
        _libvirt.libvirt.virEventUpdateTimeout(self.import_retry, -1)
        self.pass_()

    # Watches: the exporter says when an import away is back

    def watch_away(self, skip=()):
        """Open a watch for each import away that has none; close those of the imports no longer away."""
        away = self.importer.away
        for key in [key for key in self.watches if key not in away]:
            self.close_watch(key)
        self.unwatched &= set(away)
        for key, item in away.items():
            if key in self.watches or key in self.unwatched or key in skip:
                continue
            try:
                sock = wire.open_watch(item["link_address"], item["busid"], item["port"], timeout=WATCH_TIMEOUT)
            except UsbipError:
                continue  # the exporter went away since the pass: the timed passes go on
            handle = _libvirt.libvirt.virEventAddHandle(sock.fileno(), _libvirt.libvirt.VIR_EVENT_HANDLE_READABLE, self.on_watch, key)
            self.watches[key] = Watch(sock, handle, item, self.clock())

    def on_watch(self, _handle, _fd, _events, key):
        """A watch's answer: back (a pass at once), not yet (the watch is opened again, by the next timed pass when it was
        held less than WATCH_HELD_LEAST), or a refusal (the timed passes only, until the import is no longer away)."""
        watch = self.watches.get(key)
        if watch is None:
            return
        item = watch.away
        try:
            back = wire.watch_answer(watch.sock, item["link_address"], item["busid"], item["port"])
        except UsbipError as error:
            back = None
            self.unwatched.add(key)
            self.log("cannot watch for %s on %s: %s; retrying on a timer only" % (item["id"], item["source"], error))
        self.close_watch(key)
        if back:
            self.log("%s is back on %s; importing it again" % (item["id"], item["source"]))
            self.importer.back.add(key)
            self.pass_(skip=(key,))
        elif back is False and self.clock() - watch.opened >= WATCH_HELD_LEAST:
            self.watch_away()

    def close_watch(self, key):
        watch = self.watches.pop(key)
        _libvirt.libvirt.virEventRemoveHandle(watch.handle)
        watch.sock.close()

    def alive(self):
        try:
            return self.conn is not None and self.conn.isAlive() == 1
        except _libvirt.libvirt.libvirtError:
            return False

    def setup(self):
        libvirt = _libvirt.libvirt
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()
        context = _usb.pyudev.Context()
        self.monitor = _usb.pyudev.Monitor.from_netlink(context)
        self.monitor.filter_by(subsystem="usb", device_type="usb_device")
        self.monitor.start()
        self.remember_devices(context)
        libvirt.virEventAddHandle(self.monitor.fileno(), libvirt.VIR_EVENT_HANDLE_READABLE, self.on_udev, None)
        self.tick = libvirt.virEventAddTimeout(-1, self.on_tick, None)
        self.retry = libvirt.virEventAddTimeout(-1, self.on_retry, None)
        self.import_retry = libvirt.virEventAddTimeout(-1, self.on_import_retry, None)
        libvirt.virEventAddTimeout(int(self.period * 1000), self.on_period, None)
        self.missing_timer = libvirt.virEventAddTimeout(-1, self.check_missing, None)
        self.announce_timer = libvirt.virEventAddTimeout(-1, self.check_announced, None)
        if self.link_check > 0:
            libvirt.virEventAddTimeout(int(self.link_check * 1000), self.check_link, None)

    def run(self):
        self.setup()
        self.log("watching USB devices and the domains of %s" % self.uri)
        self.pass_()
        self.check_link()
        while True:
            _libvirt.libvirt.virEventRunDefaultImpl()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvmhost-usb-agent", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--uri", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    parser.add_argument("--quiet", type=float, default=0.5, help="seconds of quiet after which an event makes a pass at once (default: %(default)s)")
    parser.add_argument("--longest", type=float, default=3.0, help="longest delay of a pass in a burst of events (default: %(default)s)")
    parser.add_argument("--period", type=float, default=60.0, help="seconds between full passes without events (default: %(default)s)")
    parser.add_argument(
        "--missing-after", type=float, default=MISSING_AFTER,
        help="seconds a declared device may be absent before the event 'missing' (default: %(default)s)",
    )
    parser.add_argument("--once", action="store_true", help="make one pass and exit")
    parser.add_argument("--check", action="store_true", help="with --once: print what the pass would do, change nothing")
    args = parser.parse_args(argv)
    if _usb.pyudev is None or _libvirt.libvirt is None:
        sys.stderr.write("kvmhost-usb-agent needs %s and %s\n" % (_usb.PYUDEV_REQUIREMENT, _libvirt.LIBVIRT_REQUIREMENT))
        return 2
    if args.once:
        try:
            conn = _libvirt.connect(args.uri)
        except LibvirtError as error:
            sys.stderr.write("%s\n" % error)
            return 1
        try:
            for line in reconcile(conn, args.uri, check_mode=args.check):
                sys.stdout.write(line + "\n")
        except (PassthroughError, _libvirt.libvirt.libvirtError) as error:
            sys.stderr.write("%s\n" % error)
            return 1
        finally:
            conn.close()
        return 0
    try:
        Agent(args.uri, quiet=args.quiet, longest=args.longest, period=args.period, missing_after=args.missing_after).run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
