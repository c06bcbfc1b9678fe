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

Domains without the intent are never touched. ``Agent`` runs the passes: at start, after a burst of
udev (usb_device add/remove) or libvirt (domain started) events has been quiet for a moment, and
on a periodic timer. It prints one line per action; under systemd the journal keeps them.

Run it as ``python3 -m ansible_collections.kvmhost.usb.plugins.module_utils._agent`` (the role
``kvmhost.usb.passthrough`` installs it as the service ``kvmhost-usb-agent``).
"""

from __future__ import annotations

import argparse
import sys
import time

from dataclasses import dataclass

from ansible_collections.kvmhost.usb.plugins.module_utils import _host, _libvirt, _passthrough, _usb

LIVE = _host.LIVE
PERSISTENT = _host.PERSISTENT


@dataclass
class Action:
    verb: str
    device_id: str
    domain: str
    scope: str
    hostdev: dict

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


def declares(domain):
    """Whether the domain carries the collection's intent in any configuration."""
    return any(config.intent for config in domain.configs.values())


def _live_holders(model, device, domain):
    return [holder.name for holder, scopes in model.holders(device, exclude=domain) if LIVE in scopes]


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
            actions.extend(_actions(planner.steps[before:], entry["id"]))
    return actions, skipped


def _actions(steps, device_id):
    attached = [step for step in steps if step.action == "attach"]
    if attached:
        step = attached[-1]
        verb = "attached" if step.scope == LIVE or len(steps) == 1 else "re-bound"
        return [Action(verb, device_id, step.domain.name, step.scope, step.hostdev)]
    return [Action("removed stale", device_id, step.domain.name, step.scope, step.hostdev) for step in steps if step.action == "detach"]


def reconcile(conn, uri="qemu:///system", check_mode=False):
    """One pass over every declared domain; the lines to log, one per action (or refusal).

    Each domain is planned and carried out on its own, so a domain libvirt refuses does not hold up the others."""
    planner = _passthrough.Planner(conn, uri, check_mode)
    planner.enumerate()
    lines = []
    with _passthrough.maybe_lock(check_mode):
        planner.load_domains()
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
            except _passthrough.PassthroughError as error:
                lines.append("failed to converge %s: %s" % (domain.name, error))
                continue
            if planner.touched and not actions and not check_mode:
                lines.append("updated the intent of %s" % domain.name)
            lines.extend(("would have " if check_mode else "") + action.line() for action in actions)
    return lines


class Debouncer:
    """Coalesces a burst of events: due once no event came for ``quiet`` seconds, or ``longest``
    seconds after the first event of a burst that does not stop."""

    def __init__(self, quiet=0.5, longest=3.0):
        self.quiet = quiet
        self.longest = longest
        self.first = None
        self.last = None

    @property
    def pending(self):
        return self.first is not None

    def poke(self, now):
        if self.first is None:
            self.first = now
        self.last = now

    def due(self, now):
        if self.first is None:
            return False
        return now - self.last >= self.quiet or now - self.first >= self.longest

    def clear(self):
        self.first = None
        self.last = None


TICK_MS = 100


class Agent:
    """udev monitor and libvirt events in one process, on libvirt's default event loop."""

    def __init__(self, uri, quiet=0.5, longest=3.0, period=60.0, out=None, clock=time.monotonic):
        self.uri = uri
        self.period = period
        self.out = out or sys.stdout
        self.clock = clock
        self.debouncer = Debouncer(quiet, longest)
        self.conn = None
        self.skipped = []
        self.next_full = 0.0
        self.monitor = None
        self.tick = None

    def log(self, line):
        self.out.write(line + "\n")
        self.out.flush()

    # Events

    def poke(self):
        self.debouncer.poke(self.clock())
        _libvirt.libvirt.virEventUpdateTimeout(self.tick, TICK_MS)

    def on_udev(self, _watch, _fd, _events, _opaque):
        while True:
            device = self.monitor.poll(timeout=0)
            if device is None:
                return
            if device.action in ("add", "remove"):
                self.poke()

    def on_lifecycle(self, _conn, _domain, event, _detail, _opaque):
        if event == _libvirt.libvirt.VIR_DOMAIN_EVENT_STARTED:
            self.poke()

    def on_close(self, _conn, reason, _opaque):
        self.log("lost the connection to %s (reason %d); reconnecting" % (self.uri, reason))
        self.conn = None
        self.poke()

    def on_tick(self, _timer, _opaque):
        now = self.clock()
        if self.debouncer.due(now):
            self.debouncer.clear()
            self.pass_()
        if not self.debouncer.pending:
            _libvirt.libvirt.virEventUpdateTimeout(self.tick, -1)

    def on_period(self, _timer, _opaque):
        self.pass_()

    # Passes

    def connect(self):
        libvirt = _libvirt.libvirt
        try:
            conn = libvirt.open(self.uri)
            conn.setKeepAlive(5, 3)
            conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self.on_lifecycle, None)
            conn.registerCloseCallback(self.on_close, None)
        except libvirt.libvirtError as error:
            self.log("cannot connect to %s: %s" % (self.uri, _libvirt.error_message(error)))
            return None
        return conn

    def pass_(self):
        if self.conn is None:
            self.conn = self.connect()
            if self.conn is None:
                return
        try:
            lines = reconcile(self.conn, self.uri)
        except _libvirt.libvirt.libvirtError as error:
            self.log("reconcile failed: %s" % _libvirt.error_message(error))
            return
        except (_passthrough.PassthroughError, OSError) as error:
            self.log("reconcile failed: %s" % error)
            return
        skipped = [line for line in lines if line.startswith("not attaching")]
        for line in lines:
            # A device another domain holds is reported once, not on every pass.
            if line not in self.skipped:
                self.log(line)
        self.skipped = skipped

    def setup(self):
        libvirt = _libvirt.libvirt
        libvirt.registerErrorHandler(lambda _ctx, _error: None, None)
        libvirt.virEventRegisterDefaultImpl()
        context = _usb.pyudev.Context()
        self.monitor = _usb.pyudev.Monitor.from_netlink(context)
        self.monitor.filter_by(subsystem="usb", device_type="usb_device")
        self.monitor.start()
        libvirt.virEventAddHandle(self.monitor.fileno(), libvirt.VIR_EVENT_HANDLE_READABLE, self.on_udev, None)
        self.tick = libvirt.virEventAddTimeout(-1, self.on_tick, None)
        libvirt.virEventAddTimeout(int(self.period * 1000), self.on_period, None)

    def run(self):
        self.setup()
        self.log("watching USB devices and the domains of %s" % self.uri)
        self.pass_()
        while True:
            _libvirt.libvirt.virEventRunDefaultImpl()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvmhost-usb-agent", description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--uri", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    parser.add_argument("--quiet", type=float, default=0.5, help="seconds without events before a pass (default: %(default)s)")
    parser.add_argument("--longest", type=float, default=3.0, help="longest delay of a pass in a burst of events (default: %(default)s)")
    parser.add_argument("--period", type=float, default=60.0, help="seconds between full passes without events (default: %(default)s)")
    parser.add_argument("--once", action="store_true", help="make one pass and exit")
    parser.add_argument("--check", action="store_true", help="with --once: print what the pass would do, change nothing")
    args = parser.parse_args(argv)
    if _usb.pyudev is None or _libvirt.libvirt is None:
        sys.stderr.write("kvmhost-usb-agent needs %s and %s\n" % (_usb.PYUDEV_REQUIREMENT, _libvirt.LIBVIRT_REQUIREMENT))
        return 2
    if args.once:
        try:
            conn = _libvirt.connect(args.uri)
        except _libvirt.LibvirtError as error:
            sys.stderr.write("%s\n" % error)
            return 1
        try:
            for line in reconcile(conn, args.uri, check_mode=args.check):
                sys.stdout.write(line + "\n")
        except (_passthrough.PassthroughError, _libvirt.libvirt.libvirtError) as error:
            sys.stderr.write("%s\n" % error)
            return 1
        finally:
            conn.close()
        return 0
    try:
        Agent(args.uri, quiet=args.quiet, longest=args.longest, period=args.period).run()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
