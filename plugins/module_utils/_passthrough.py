# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The planner: a host's declared USB passthrough turned into libvirt steps, planned as a whole.

usb_passthrough (the host's whole declared state), usb_attach, usb_detach and the reattach agent all
plan here, on one host model (``_host.HostModel``): one enumeration, one lock, one read of every
domain. Each planned step changes the model at once, so later decisions see it, and is carried out
afterwards in a fixed order: every detach (live, then persistent) of every domain before any attach
anywhere (live, then persistent), then the intent metadata. So moves, swaps and rotations need no
``steal`` and no device is ever in two guests at once. When libvirt refuses a step, the steps done so
far are undone, across all domains. Check mode plans and reports, and carries out nothing. Diffs are
rendered from the model before and after. A change carried out is announced in the host's events (``_events``): a
device attached to or detached from a domain, by a converge or, for the agent's passes, by the agent (``by``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ansible_collections.kvmhost.usb.plugins.module_utils import _crosshost, _declaration, _events, _host, _intent, _libvirt, _lock, _mounts, _usb
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import HostError, LibvirtError, PassthroughError, SelectorError
from ansible_collections.kvmhost.usb.plugins.module_utils._host import LIVE, PERSISTENT, Config, Domain, HostModel


@dataclass
class Step:
    domain: Domain
    scope: str
    action: str
    hostdev: dict | None = None
    intent: list | None = None
    previous: list | None = None
    # The plugged-in device the hostdev belongs to; an attach relies on it.
    device: dict | None = None
    # A "define": the steps of a stopped domain, written with one define, and its definition before them.
    changes: list | None = None
    definition: str | None = None
    # The device the step is about, an absent one's stand-in included (``device`` is None for it); None for a hostdev
    # that designates no device the plan knows.
    subject: dict | None = None

    def describe(self) -> str:
        if self.action == "define":
            return "write the definition of %s (%s)" % (self.domain.name, "; ".join(change.describe().split(": ", 1)[0] for change in self.changes))
        if self.action == "intent":
            ids = ", ".join(entry["id"] for entry in self.intent) or "none"
            return "record the intent of %s (%s): %s" % (self.domain.name, self.scope, ids)
        return "%s %s %s (%s): %s" % (
            self.action,
            "to" if self.action == "attach" else "from",
            self.domain.name,
            self.scope,
            _libvirt.hostdev_xml(self.hostdev),
        )


SCOPE_ORDER = (LIVE, PERSISTENT)


def _device_key(device: dict) -> Any:
    return ("absent", device["id"]) if device.get("absent") else id(device)


class Planner:
    def __init__(self, conn: Any, uri: str, check_mode: bool, diff: bool = False) -> None:
        self.conn = conn
        self.uri = uri
        self.check_mode = check_mode
        # The before and after of the touched domains are rendered only for --diff.
        self.want_diff = diff
        self.context = _usb.pyudev.Context()
        self.model = HostModel([], [])
        self.devices = []
        self.steps = []
        self.touched = []
        self.warnings = []
        self.imports = _crosshost.Imports(check_mode)
        # Domains the operator wants changed live only (usb_attach with persistent: false).
        self.live_only = []
        # Who carries the plan out, as the events say (``_events.BY``): the agent's passes set "agent".
        self.by = "converge"

    # Reading the host

    def enumerate(self) -> None:
        self.model = HostModel(_usb.enumerate_devices(self.context), [])
        self.devices = self.model.devices

    def load_domains(self) -> None:
        try:
            self.model.domains = _host.load_domains(self.conn, self.uri)
        except HostError as error:
            raise PassthroughError(str(error))

    def lookup(self, name_or_uuid: str) -> Any:
        """The domain's handle before the host is read, so an unknown domain fails first."""
        try:
            handle = _libvirt.lookup_domain(self.conn, name_or_uuid)
            if handle is not None:
                return handle
            names = sorted(domain.name() for domain in self.conn.listAllDomains(0))
        except _libvirt.libvirt.libvirtError as error:
            raise PassthroughError("Cannot look up domain %r at %s: %s" % (name_or_uuid, self.uri, _libvirt.error_message(error)))
        raise PassthroughError("Unknown domain %r at %s; its domains: %s" % (name_or_uuid, self.uri, ", ".join(names) or "none"))

    def domain(self, name_or_uuid: str) -> Domain:
        domain = self.model.domain(name_or_uuid)
        if domain is None:
            raise PassthroughError("Domain %s disappeared while it was being changed" % name_or_uuid)
        return domain

    def choose(self, domain: Domain | None, selector: dict, allow_absent: bool = False) -> dict:
        """The device a selector chooses for a domain. Beyond the plain rule (exactly one present device
        matches): a device the domain holds stays its own when a twin makes the selector ambiguous, the
        device the domain's intent recorded for this selector is found after its id changed, and with
        ``allow_absent`` a device named by its full serial id may be absent. A selector with ``host`` chooses the
        device imported for it (in check mode, a stand-in when it is not imported yet)."""
        if _declaration.is_remote(selector):
            return self.remote_device(selector)
        try:
            return _usb.select_device(self.devices, selector)
        except SelectorError:
            matches = [device for device in self.model.candidates if _usb.selector_matches(selector, device)]
            if domain is not None and len(matches) > 1:
                held = [device for device in matches if any(self.model.claims(config, device) for config in domain.configs.values())]
                if len(held) == 1:
                    return held[0]
            if domain is not None and not matches:
                recorded = self.model.recorded(domain, selector)
                if recorded and recorded[1] is not None:
                    return recorded[1]
                if allow_absent and recorded:
                    return _host.absent_device(recorded[0]["id"])
            if allow_absent and not matches and _host.entry_serial({"id": selector.get("id", "")}) and set(selector) == {"id"}:
                return _host.absent_device(selector["id"])
            raise

    def remote_device(self, selector: dict) -> dict:
        record = self.imports.record(selector)
        if record is None:
            if self.check_mode:
                return _crosshost.stand_in(selector)
            raise SelectorError("%s is not imported" % _crosshost.describe(selector))
        return _crosshost.local_device(self.model.candidates, record, selector)

    def resolve(self, domain: Domain | None, selectors: list[dict], allow_absent: bool = False) -> list[tuple[dict, dict]]:
        resolved = []
        for selector in selectors:
            device = self.choose(domain, selector, allow_absent)
            for earlier_selector, earlier in resolved:
                if _device_key(earlier) == _device_key(device):
                    raise SelectorError(
                        "Selectors (%s) and (%s) both choose %s"
                        % (_declaration.describe_selector(earlier_selector), _declaration.describe_selector(selector), device["id"])
                    )
            resolved.append((selector, device))
        return resolved

    def refuse_host_critical(self, devices: list[dict]) -> None:
        table = _mounts.mount_table()
        for device in devices:
            if device.get("absent"):
                continue
            mounts = _mounts.backing_mounts(self.context, device["sys_path"], table)
            if mounts:
                raise PassthroughError(
                    "Device %s backs mounted filesystem(s) of the host: %s. Set allow_host_critical: true to pass it through anyway."
                    % (_usb.describe_device(device), ", ".join(mounts))
                )

    def wanted_hostdev(self, device: dict, scope: str) -> dict:
        """Live: the exact device. Persistent: vendor:product, with the address only when another
        device of the host has the same vendor:product, and optional so the domain starts without it."""
        hostdev = {"vendor_id": device["vendor_id"], "product_id": device["product_id"], "bus": None, "device": None, "startup_policy": None}
        same = [other for other in self.model.candidates if other["vendor_device_id"] == device["vendor_device_id"]]
        if scope == LIVE or len(same) > 1:
            hostdev["bus"] = device["bus"]
            hostdev["device"] = device["device"]
        if scope == PERSISTENT:
            hostdev["startup_policy"] = "optional"
        return hostdev

    # Planning: each step changes the model at once and is carried out later

    def _touch(self, domain: Domain) -> None:
        if domain not in self.touched:
            self.touched.append(domain)

    def _hostdev_step(self, domain: Domain, scope: str, action: str, hostdev: dict, device: dict | None = None) -> None:
        hostdevs = domain.configs[scope].hostdevs
        if action == "attach":
            hostdevs.append(hostdev)
        else:
            hostdevs.remove(hostdev)
        subject = device
        if device is not None and device.get("absent"):
            device = None
        self.steps.append(Step(domain=domain, scope=scope, action=action, hostdev=hostdev, device=device, subject=subject))
        self._touch(domain)

    def _record(self, domain: Domain, config: Config, device: dict, selector: dict, rebound: bool) -> None:
        """Put the device's entry into the configuration's intent. An entry that already means the device
        keeps its id (the id rule may have changed the device's since) and, unless the hostdev was re-bound
        now or one pinned to the device's address stands (a pass killed before it recorded the re-bind), the
        address it was bound at; one of an absent device keeps what will find it again."""
        entry = _host.new_entry(device, selector)
        if not device.get("absent"):
            rebound = rebound or any(_host.pinned(hostdev) and self.model.designates(hostdev) == [device] for hostdev in config.hostdevs)
        for index, existing in enumerate(config.intent):
            if existing["id"] == entry["id"] or (not device.get("absent") and self.model.find(existing) is device):
                if device.get("absent"):
                    entry = dict(existing, **dict((key, entry[key]) for key in ("selector",) + _declaration.REMOTE_FIELDS if key in entry))
                for key in _declaration.REMOTE_FIELDS:
                    if existing.get(key) and key not in entry:
                        entry[key] = existing[key]
                entry["id"] = existing["id"]
                if not rebound and existing.get("address"):
                    entry["address"] = existing["address"]
                if entry != existing:
                    config.intent[index] = entry
                    self._touch(domain)
                return
        config.intent.append(entry)
        self._touch(domain)

    def plan_attach(self, domain: Domain, scopes: list[str], selector: dict, device: dict) -> None:
        for scope in scopes:
            config = domain.configs[scope]
            rebound = False
            if device.get("absent"):
                if scope == LIVE:
                    for hostdev in self.model.hostdevs_of(config, device):
                        self._hostdev_step(domain, scope, "detach", hostdev)
            else:
                belonging = self.model.hostdevs_of(config, device)
                if not any(self.model.pins(hostdev, device, scope) for hostdev in belonging):
                    if belonging:
                        # Left by a replug, or too vague to start the domain: re-bind it.
                        self._hostdev_step(domain, scope, "detach", belonging[0], device)
                    self._hostdev_step(domain, scope, "attach", self.wanted_hostdev(device, scope), device)
                    rebound = True
            self._record(domain, config, device, selector, rebound)

    def plan_repin(self, domain: Domain) -> None:
        """Pin a persistent hostdev that designates several devices (a twin appeared beside a device held by
        vendor:product) to the device the domain's intent means, so that the domain still starts with it."""
        config = domain.configs.get(PERSISTENT)
        if config is None:
            return
        for entry, device in self.model.meant(config):
            if device is None:
                continue
            for hostdev in self.model.hostdevs_of(config, device):
                if len(self.model.designates(hostdev)) > 1:
                    self._hostdev_step(domain, PERSISTENT, "detach", hostdev, device)
                    self._hostdev_step(domain, PERSISTENT, "attach", self.wanted_hostdev(device, PERSISTENT), device)
                    self._record(domain, config, device, entry["selector"], rebound=True)

    def plan_exclusive(self, domain: Domain, scopes: list[str], kept: list[dict]) -> None:
        """Take from the domain every USB device it claims other than ``kept``: the hostdevs that belong
        to none of them (stale ones and hand-written ones included) and the other intent entries."""
        kept_keys = [_device_key(device) for device in kept]
        for scope in scopes:
            config = domain.configs[scope]
            for hostdev in [hostdev for hostdev in config.hostdevs if not any(self.model.belongs(hostdev, device, config) for device in kept)]:
                self._hostdev_step(domain, scope, "detach", hostdev)
            remaining = [entry for entry in config.intent if self._entry_key(entry) in kept_keys]
            if remaining != config.intent:
                config.intent[:] = remaining
                self._touch(domain)

    def _entry_key(self, entry: dict) -> Any:
        device = self.model.find(entry)
        return _device_key(device) if device is not None else ("absent", entry["id"])

    def plan_detach(self, domain: Domain, device: dict) -> None:
        key = _device_key(device)
        for scope, config in domain.configs.items():
            for hostdev in self.model.hostdevs_of(config, device):
                self._hostdev_step(domain, scope, "detach", hostdev, device)
            kept = [entry for entry in config.intent if self._entry_key(entry) != key]
            if kept != config.intent:
                config.intent[:] = kept
                self._touch(domain)

    def _intent_steps(self) -> list[Step]:
        steps = []
        for domain in self.touched:
            for scope, config in domain.configs.items():
                previous = domain.before[scope].intent
                if config.intent != previous:
                    steps.append(Step(domain=domain, scope=scope, action="intent", intent=config.intent, previous=previous))
        return steps

    # Carrying it out

    def ordered_steps(self) -> list[Step]:
        def picked(action: str, scope: str) -> list[Step]:
            return [step for step in self.steps if step.action == action and step.scope == scope]

        return picked("detach", LIVE) + picked("detach", PERSISTENT) + picked("attach", LIVE) + picked("attach", PERSISTENT) + self._intent_steps()

    def execute(self) -> list[Step]:
        """Carry the plan out; when a step fails, undo the steps done and fail saying what happened.

        The host may change between the plan and its steps. A device the plan attaches that was unplugged (or
        replugged at a new address) meanwhile fails the change, naming the device, with the steps done undone:
        it is checked before the first step, before each step that attaches it, and before the intent that
        records it. A device that only leaves a domain does not stop the change: a detach needs no device, and
        undoing it would give the domain back a hostdev of a device that is gone. A domain that stopped
        running meanwhile keeps its persistent steps and intent, the live ones being moot (its live
        configuration ended with it): the change ends as usb_attach to a stopped domain would, and a warning
        says so. Where the operator asked for the live domain only (persistent: false), it fails instead.
        """
        steps = self.ordered_steps()
        if self.check_mode:
            return steps
        relied = [step.device for step in steps if step.action == "attach" and step.device is not None]
        # A stopped domain's steps change only its definition: they are made together and written with one
        # define, at its last step, after every check that comes before it.
        last_of_stopped = dict((step.domain, index) for index, step in enumerate(steps) if LIVE not in step.domain.configs)
        staged = {}
        done = []
        for index, step in enumerate(steps):
            if index == 0 or (step.action == "intent" and steps[index - 1].action != "intent"):
                # Before the first step, and before the intent records them: every device the plan attaches.
                self._check_plugged(relied, step, done)
                if step.action == "intent":
                    self._warn_unplugged_detached(steps)
            elif step.action == "attach" and step.device is not None:
                self._check_plugged([step.device], step, done)
            if step.scope == LIVE and LIVE not in step.domain.configs:
                continue
            if step.domain in last_of_stopped:
                staged.setdefault(step.domain, []).append(step)
                if index != last_of_stopped[step.domain]:
                    continue
                step = Step(domain=step.domain, scope=PERSISTENT, action="define", changes=staged.pop(step.domain))
            try:
                _carry_out(step)
            except (_libvirt.libvirt.libvirtError, LibvirtError) as error:
                if step.scope == LIVE and self._stopped(step, done):
                    continue
                message = "libvirt refused to %s: %s" % (step.describe(), _libvirt.error_message(error))
                unplugged = self._unplugged(relied + [other.device for other in steps if other.device is not None])
                if unplugged:
                    message = "%s: %s" % (_unplugged_text(unplugged), message)
                self._fail(message, done, unplugged)
            done.append(step)
        if steps and steps[-1].action != "intent":
            self._check_plugged(relied, None, done)
            self._warn_unplugged_detached(steps)
        self.announce(steps)
        return steps

    def announce(self, steps: list[Step]) -> list[dict]:
        """The events of a change carried out: per domain and device, ``attached`` with the scopes it was attached in,
        ``detached`` with those it left; a scope where its hostdev was only re-bound (detached and attached again, after
        a replug) is no change of who holds it. A hostdev that designates no device the plan knows is told by its
        ``hostdev`` (as usb_facts shows a domain's hostdevs). The events written (their store failing fails nothing)."""
        changes = {}
        for step in steps:
            if step.action not in ("attach", "detach") or (step.scope == LIVE and LIVE not in step.domain.configs):
                continue
            subject = step.subject or step.device
            key = (step.domain.name, subject["id"] if subject else _libvirt.hostdev_xml(step.hostdev))
            change = changes.setdefault(key, {"step": step, "subject": subject, "attach": [], "detach": []})
            change[step.action].append(step.scope)
        written = []
        for (domain, _key), change in changes.items():
            for action, kind in (("attach", "attached"), ("detach", "detached")):
                other = "detach" if action == "attach" else "attach"
                scopes = [scope for scope in SCOPE_ORDER if scope in change[action] and scope not in change[other]]
                if not scopes:
                    continue
                if change["subject"] is not None:
                    what = {"device": _usb.public_view(change["subject"])}
                else:
                    what = {"hostdev": self.model.hostdev_view(change["step"].hostdev)}
                event = _events.emit(kind, domain=domain, by=self.by, scopes=scopes, **what)
                if event is not None:
                    written.append(event)
        return written

    def _unplugged(self, devices: list[dict]) -> list[dict]:
        found = []
        for device in devices:
            if device not in found and not _usb.still_plugged(device):
                found.append(device)
        return found

    def _check_plugged(self, devices: list[dict], step: Step | None, done: list[Step]) -> None:
        unplugged = self._unplugged(devices)
        if unplugged:
            when = "before it could %s" % step.describe() if step is not None else "before the change was finished"
            self._fail("%s, %s" % (_unplugged_text(unplugged), when), done, unplugged)

    def _warn_unplugged_detached(self, steps: list[Step]) -> None:
        leaving = [step.device for step in steps if step.action == "detach" and step.device is not None]
        for device in self._unplugged(leaving):
            names = sorted(set(step.domain.name for step in steps if step.device is device and step.action == "detach"))
            self.warnings.append(
                "Device %s was unplugged during the change; it was taken from %s all the same (a detach needs no device)."
                % (_usb.describe_device(device), ", ".join(names))
            )

    def _stopped(self, step: Step, done: list[Step]) -> bool:
        """After a live step failed: whether its domain stopped running meanwhile and the change goes on
        without its live steps (see ``execute``). Fails when the change cannot go on without them."""
        domain = step.domain
        try:
            if domain.handle.isActive():
                return False
            state = _libvirt.domain_state_name(domain.handle)
        except _libvirt.libvirt.libvirtError:
            state = "undefined"
        domain.configs.pop(LIVE, None)
        domain.state = state
        message = "Domain %s stopped running during the change (it is now %s), before it could %s" % (domain.name, state, step.describe())
        if domain in self.live_only:
            self._fail(message + "; persistent: false changes the running domain only", done)
        if PERSISTENT not in domain.configs or state == "undefined":
            self._fail(message + "; it has no persistent configuration to change instead", done)
        self.warnings.append(
            message + ". Its live steps were skipped (its live configuration ended with it); its persistent configuration "
            "and intent were changed as planned, so it has the devices when it starts."
        )
        return True

    def _fail(self, message: str, done: list[Step], unplugged: list[dict] = ()) -> None:
        undone, kept_out, problems = self._undo(done, unplugged)
        if problems:
            raise PassthroughError(message + ". Undoing the earlier steps failed too, check: " + "; ".join(problems))
        if done:
            names = sorted(set(step.domain.name for step in done))
            text = message + ". The %d earlier step(s) were undone; %s left as they were." % (len(undone), ", ".join(names))
            if kept_out:
                text += (
                    " Not put back, as its device is gone: %s (the persistent hostdev and the intent still name the device,"
                    " so the reattach agent attaches it when it returns)." % "; ".join(kept_out)
                )
            raise PassthroughError(text)
        raise PassthroughError(message + ". Nothing was changed.")

    def _undo(self, done: list[Step], unplugged: list[dict] = ()) -> tuple[list[Step], list[str], list[str]]:
        """Undo the steps done, last first: ``(undone, kept_out, problems)``. Live steps of a domain that stopped
        running are moot, and a live hostdev of an unplugged device is not given back (it would designate nothing)."""
        undone = []
        kept_out = []
        problems = []
        for step in reversed(done):
            if step.scope == LIVE and LIVE not in step.domain.configs:
                continue
            if step.scope == LIVE and step.action == "detach" and step.device is not None and step.device in unplugged:
                kept_out.append(step.describe())
                continue
            try:
                _carry_out(step, undo=True)
                undone.append(step)
            except _libvirt.libvirt.libvirtError as error:
                problems.append("%s: %s" % (step.describe(), _libvirt.error_message(error)))
        return undone, kept_out, problems

    def start(self, domain: Domain) -> None:
        if not self.check_mode:
            try:
                domain.handle.create()
            except _libvirt.libvirt.libvirtError as error:
                raise PassthroughError("The devices are in place, but starting domain %s failed: %s" % (domain.name, _libvirt.error_message(error)))
        domain.state = "running"

    def start_all(self, domains: list[Domain]) -> list[Domain]:
        started = [domain for domain in domains if not domain.running]
        for domain in started:
            self.start(domain)
        return started

    # Reporting

    def diff(self, domains: list[Domain]) -> dict | None:
        if not self.want_diff:
            return None
        return {
            "before": "".join(_render(domain, domain.before) for domain in domains),
            "after": "".join(_render(domain, domain.configs) for domain in domains),
        }

    def result(self, steps: list[Step], started: list[Domain], imports: bool = True) -> dict:
        actions = [step.describe() for step in steps] + ["start %s" % domain.name for domain in started]
        if imports:
            actions = self.imports.actions + actions + self.imports.released
        return {"changed": bool(actions), "actions": actions}

    # The operations

    def attach_scopes(self, domain: Domain, persistent: bool = True) -> list[str]:
        if LIVE in domain.configs:
            return [LIVE, PERSISTENT] if persistent and PERSISTENT in domain.configs else [LIVE]
        if not persistent:
            raise PassthroughError(
                "persistent: false attaches to the running domain only, and domain %s is %s. Start it first, or leave persistent at true."
                % (domain.name, domain.state)
            )
        return [PERSISTENT]

    def plan_declaration(
        self,
        declaration: dict,
        steal: bool = False,
        whole_host: bool = False,
        allow_host_critical: bool = False,
        allow_absent: bool = True,
        persistent: bool = True,
    ) -> dict:
        """Plan a declared state (see ``normalize_declaration``) on the read host: ``{domain: [(selector, device)]}``.

        A declaration that contradicts itself or names what the host does not have fails here, before
        any step is planned."""
        unknown = [name for name in declaration if self.model.domain(name) is None]
        if unknown:
            raise PassthroughError(
                "Unknown domain%s %s at %s; its domains: %s"
                % ("s" if len(unknown) > 1 else "", ", ".join(repr(name) for name in unknown), self.uri, self.model.domain_names())
            )
        wanted = {}
        owners = {}
        for name, settings in declaration.items():
            domain = self.model.domain(name)
            try:
                resolved = self.resolve(domain, settings["devices"], allow_absent)
            except SelectorError as error:
                raise PassthroughError(str(error) if len(declaration) == 1 else "Domain %s: %s" % (domain.name, error))
            for _selector, device in resolved:
                other = owners.get(_device_key(device))
                if other is not None and other is not domain:
                    raise PassthroughError(
                        "Device %s is declared for both %s and %s; one device goes to one VM." % (device["id"], other.name, domain.name)
                    )
                owners[_device_key(device)] = domain
            wanted[domain] = (settings, resolved)
        if not allow_host_critical:
            self.refuse_host_critical([device for _settings, resolved in wanted.values() for _selector, device in resolved])
        for holder in list(self.model.domains):
            self._plan_departures(holder, wanted, owners, steal, whole_host)
        for domain, (settings, resolved) in wanted.items():
            scopes = self.attach_scopes(domain, persistent)
            if settings["exclusive"] or whole_host:
                self.plan_exclusive(domain, scopes, [device for _selector, device in resolved])
            for selector, device in resolved:
                self.plan_attach(domain, scopes, selector, device)
                if device.get("absent") and not device.get("remote"):
                    self.warnings.append(
                        "Device %s declared for %s is not plugged in: its intent is recorded, and the reattach agent attaches it when it appears."
                        % (device["id"], domain.name)
                    )
        return wanted

    def _plan_departures(self, holder: Domain, wanted: dict, owners: dict, steal: bool, whole_host: bool) -> None:
        """Take from ``holder`` what the declaration gives another domain; with ``whole_host``, an undeclared
        domain loses everything (declared domains are emptied of the rest by ``plan_exclusive``)."""
        declared = holder in wanted
        if not declared and whole_host:
            self.plan_exclusive(holder, list(holder.configs), [])
            return
        if not declared:
            self.plan_repin(holder)
        claimed = {}
        for scope, config in holder.configs.items():
            for device in self.model.claimed(config):
                claimed.setdefault(_device_key(device), (device, []))[1].append(scope)
        for key, (device, scopes) in claimed.items():
            owner = owners.get(key)
            if owner is None or owner is holder:
                continue
            if not declared and not (steal or wanted[owner][0].get("steal")):
                raise PassthroughError(
                    "Device %s is held by domain %s (%s); one device goes to one VM. Detach it there first, or set steal: true to move it to %s."
                    % (device["id"] if device.get("absent") else _usb.describe_device(device), holder.name, ", ".join(scopes), owner.name)
                )
            self.plan_detach(holder, device)

    def converge(self, domains: dict, steal: bool = False, whole_host: bool = False, allow_host_critical: bool = False) -> dict:
        """usb_passthrough: the host's declared state in one pass."""
        declaration = _declaration.normalize_declaration(domains)
        # Imports are made under the host lock, as the agent makes them: two at once could pick the same free vhci port.
        with _lock.maybe_lock(self.check_mode):
            self.imports.prepare([(name, selector) for name, settings in declaration.items() for selector in settings["devices"]])
            self.enumerate()
            self.load_domains()
            drift = self.model.drift(declaration, inventory=False)
            try:
                wanted = self.plan_declaration(declaration, steal=steal, whole_host=whole_host, allow_host_critical=allow_host_critical)
                self.plan_dropped_imports(wanted)
                steps = self.execute()
            except (PassthroughError, SelectorError) as error:
                self.imports.undo()
                error.drift = drift
                raise
            self.release_unclaimed()
            started = self.start_all([domain for domain, (settings, _resolved) in wanted.items() if settings["auto_start"]])
        result = self.result(steps, started)
        result["domains"] = {}
        for domain in self.model.domains:
            if domain in wanted or domain in self.touched:
                own = self.result([step for step in steps if step.domain is domain], [domain] if domain in started else [], imports=False)
                result["domains"][domain.name] = dict(
                    domain.summary(),
                    actions=self.imports.by_domain.get(domain.name, []) + own["actions"],
                    devices=[device["id"] for _selector, device in wanted[domain][1]] if domain in wanted else [],
                )
        result["drift"] = drift
        result["warnings"] = self.warnings
        result["diff"] = self.diff(self.touched or list(wanted))
        return result

    def attach(
        self,
        domain_name: str,
        selectors: list[dict],
        persistent: bool = True,
        auto_start: bool = False,
        steal: bool = False,
        allow_host_critical: bool = False,
        exclusive: bool = False,
    ) -> dict:
        """usb_attach: one domain gets the devices, in addition to what it has unless ``exclusive``."""
        handle = self.lookup(domain_name)
        with _lock.maybe_lock(self.check_mode):
            self.imports.prepare([(handle.name(), selector) for selector in selectors])
            self.enumerate()
            self.load_domains()
            domain = self.domain(handle.UUIDString())
            if not persistent:
                self.live_only.append(domain)
            declaration = {domain.uuid: {"devices": selectors, "exclusive": exclusive, "auto_start": auto_start}}
            try:
                wanted = self.plan_declaration(declaration, steal=steal, allow_host_critical=allow_host_critical, allow_absent=False, persistent=persistent)
                steps = self.execute()
            except SelectorError as error:
                self.imports.undo()
                raise PassthroughError(str(error))
            except PassthroughError:
                self.imports.undo()
                raise
            started = self.start_all([domain] if auto_start else [])
        result = self.result(steps, started)
        result["devices"] = [self.model.device_view(device) for _selector, device in wanted[domain][1]]
        result["domain"] = domain.summary()
        result["warnings"] = self.warnings
        result["diff"] = self.diff(self.touched or [domain])
        return result

    def detach(self, domain_name: str | None, selectors: list[dict], auto_start: bool = False) -> dict:
        """usb_detach: the devices leave one domain, or whichever domains hold them."""
        handle = self.lookup(domain_name) if domain_name else None
        self.imports.find_standing(selectors)
        with _lock.maybe_lock(self.check_mode):
            self.enumerate()
            self.load_domains()
            only = self.domain(handle.UUIDString()) if handle else None
            domains = [only] if only else self.model.domains
            present = []
            for selector in selectors:
                if self.imports.record(selector) or any(_usb.selector_matches(selector, device) for device in self.devices):
                    present.append(self.choose(only, selector))
                    continue
                absent = self.intended_absent(domains, selector)
                for domain, device in absent:
                    self.plan_detach(domain, device)
            for device in present:
                for domain in domains:
                    if only or any(self.model.claims(config, device) for config in domain.configs.values()):
                        self.plan_detach(domain, device)
            steps = self.execute()
            self.release_unclaimed(list(self.imports.records.values()))
            started = self.start_all(([only] if only else self.touched) if auto_start else [])
        result = self.result(steps, started)
        result["devices"] = [self.model.device_view(device) for device in present]
        result["domain"] = only.summary() if only else None
        result["domains"] = [domain.summary() for domain in self.touched]
        result["warnings"] = self.warnings
        result["diff"] = self.diff(self.touched or ([only] if only else []))
        return result

    def plan_dropped_imports(self, wanted: dict) -> None:
        """A device imported from another host stays only while declared: the export on that host follows the
        same declaration. An intent entry with ``host`` that the declaration no longer gives its domain leaves it."""
        for domain in self.model.domains:
            resolved = wanted.get(domain, ({}, []))[1]
            kept = [_device_key(device) for _selector, device in resolved]
            selectors = [_declaration.recorded_selector(selector) for selector, _device in resolved]
            for config in list(domain.configs.values()):
                for entry in list(config.intent):
                    if entry.get("host") and self._entry_key(entry) not in kept and entry["selector"] not in selectors:
                        device = self.model.find(entry)
                        self.plan_detach(domain, device if device is not None else _host.absent_device(entry["id"]))

    def release_unclaimed(self, records: list[dict] | None = None) -> None:
        """Release the imports (all of this host's, or ``records``) whose device no domain's intent claims any more."""
        records = _crosshost.standing_imports() if records is None else records
        if not records:
            return
        claimed = [device for domain in self.model.domains for config in domain.configs.values() for device in self.model.claimed(config)]
        self.imports.release(_crosshost.unclaimed(records, self.devices, claimed))
        self.warnings.extend(self.imports.warnings)

    def intended_absent(self, domains: list[Domain], selector: dict) -> list[tuple[Domain, dict]]:
        """For a selector that matches no present device: the domains whose intent names it, and the device it named."""
        found = []
        for domain in domains:
            recorded = self.model.recorded(domain, selector)
            if recorded:
                entry, device = recorded
                found.append((domain, device if device is not None else _host.absent_device(entry["id"])))
        if not found:
            # Nothing names it either: the ordinary "no device matches" error, with what the host has.
            _usb.select_device(self.devices, selector)
        return found


def _unplugged_text(devices: list[dict]) -> str:
    if len(devices) == 1:
        return "Device %s was unplugged during the change" % _usb.describe_device(devices[0])
    return "Devices %s were unplugged during the change" % "; ".join(_usb.describe_device(device) for device in devices)


def _carry_out(step: Step, undo: bool = False) -> None:
    libvirt = _libvirt.libvirt
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if step.scope == LIVE else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    handle = step.domain.handle
    if step.action == "define":
        if undo:
            handle.connect().defineXML(step.definition)
            return
        step.definition = _libvirt.persistent_xml(handle)
        handle.connect().defineXMLFlags(_defined(step.definition, step.changes), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        return
    if step.action == "intent":
        entries = step.previous if undo else step.intent
        if entries:
            handle.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, _intent.to_xml(entries), _intent.PREFIX, _intent.NAMESPACE, flags)
        else:
            handle.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, None, None, _intent.NAMESPACE, flags)
        return
    attach = (step.action == "attach") != undo
    xml = _libvirt.hostdev_xml(step.hostdev)
    if attach:
        handle.attachDeviceFlags(xml, flags)
    else:
        handle.detachDeviceFlags(xml, flags)


def _defined(definition: str, changes: list[Step]) -> str:
    """A domain's definition with the changes made: hostdevs detached and attached, the intent recorded. A hostdev
    to detach that is not there is refused, as libvirt's detach would refuse it."""
    devices = _libvirt.devices_element(definition)
    if devices is None:
        raise LibvirtError("cannot find the <devices> element of the definition")
    intent = None
    for change in changes:
        if change.action == "intent":
            intent = change.intent
        elif change.action == "attach":
            _libvirt.add_hostdev(devices, change.hostdev)
        elif not _libvirt.remove_hostdev(devices, change.hostdev):
            raise LibvirtError("device not found: %s" % _libvirt.hostdev_xml(change.hostdev))
    definition = _libvirt.with_devices(definition, devices)
    if intent is None:
        return definition
    try:
        return _intent.in_domain_xml(definition, intent)
    except ValueError as error:
        raise LibvirtError(str(error))


def _render(domain: Domain, configs: dict) -> str:
    lines = []
    for scope in (PERSISTENT, LIVE):
        config = configs.get(scope)
        if config is None:
            continue
        lines.append("%s (%s configuration):" % (domain.name, scope))
        lines.extend("  " + _libvirt.hostdev_xml(hostdev) for hostdev in config.hostdevs)
        if config.intent:
            lines.extend("  " + line for line in _intent.display(config.intent).splitlines())
    return "".join(line + "\n" for line in lines)
