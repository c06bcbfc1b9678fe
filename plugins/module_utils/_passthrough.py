# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Attach USB devices to libvirt domains and detach them: what usb_attach and usb_detach share.

A run reads every domain (live and persistent configuration, hostdevs and intent), plans the
changes on that in-memory model, and then carries them out in a fixed order: live hostdevs,
persistent hostdevs, intent metadata. When libvirt refuses a step the steps done so far are
undone, so a refused live attach leaves the persistent configuration as it was. Check mode plans
and reports, and carries out nothing. Diffs are rendered from the model before and after.

Which hostdev of a configuration stands for a device:

* one that designates exactly that device among the host's present devices (by bus/device
  address, or by vendor:product when only one device has it);
* one that designates several devices (vendor:product without address) or none (an address left
  by a replug), with the device's vendor:product, when the intent names the device or names no
  device of that vendor:product at all.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import tempfile

from dataclasses import dataclass, field
from typing import Any, Iterator

from ansible_collections.kvmhost.usb.plugins.module_utils import _intent, _libvirt, _mounts, _usb

LIVE = "live"
PERSISTENT = "persistent"

LOCK_PATH = "/run/lock/kvmhost-usb.lock"
# Tests point this at their own file; operators have no reason to.
LOCK_PATH_ENV = "KVMHOST_USB_LOCK"


class PassthroughError(Exception):
    """An attach or detach that must not or could not be done; the message says what was left changed, if anything."""


@dataclass
class Config:
    hostdevs: list
    intent: list


@dataclass
class Domain:
    handle: Any
    name: str
    uuid: str
    state: str
    configs: dict
    before: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"name": self.name, "uuid": self.uuid, "state": self.state}


@dataclass
class Step:
    domain: Domain
    scope: str
    action: str
    hostdev: dict | None = None
    intent: list | None = None
    previous: list | None = None

    def describe(self) -> str:
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


def normalize_selectors(items: list, allow_empty: bool = False) -> list[dict]:
    if not items and not allow_empty:
        raise _usb.SelectorError("No devices given: 'devices' needs at least one selector")
    return [_usb.normalize_selector(item) for item in items]


@contextlib.contextmanager
def host_lock(path: str | None = None) -> Iterator[None]:
    """Serialise passthrough changes on this host, across processes (flock, released on exit)."""
    path = path or os.environ.get(LOCK_PATH_ENV) or LOCK_PATH
    if not os.path.isdir(os.path.dirname(path)):
        path = os.path.join(tempfile.gettempdir(), os.path.basename(path))
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as error:
        raise PassthroughError("Cannot open the host lock %s: %s" % (path, error))
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _read_config(xml_text: str) -> Config:
    return Config(hostdevs=_libvirt.usb_hostdevs(xml_text), intent=_intent.from_domain_xml(xml_text))


def load_domain(handle: Any) -> Domain:
    configs = {}
    if handle.isActive():
        configs[LIVE] = _read_config(_libvirt.domain_xml(handle))
    if handle.isPersistent():
        configs[PERSISTENT] = _read_config(_libvirt.domain_xml(handle, inactive=True))
    return Domain(
        handle=handle,
        name=handle.name(),
        uuid=handle.UUIDString(),
        state=_libvirt.domain_state_name(handle),
        configs=configs,
        before=copy.deepcopy(configs),
    )


def _vendor_product(item: dict) -> tuple:
    return (item.get("vendor_id"), item.get("product_id"))


def absent_device(device_id: str) -> dict:
    """A stand-in for a device that is not plugged in, known only by the id an intent recorded."""
    return {"id": device_id, "vendor_id": device_id[0:4], "product_id": device_id[5:9], "vendor_device_id": device_id[0:9]}


class Passthrough:
    def __init__(self, conn: Any, uri: str, check_mode: bool) -> None:
        self.conn = conn
        self.uri = uri
        self.check_mode = check_mode
        self.context = _usb.pyudev.Context()
        self.devices = []
        self.candidates = []
        self.domains = []
        self.steps = []
        self.touched = []

    # Reading the host

    def enumerate(self) -> None:
        self.devices = _usb.enumerate_devices(self.context)
        self.candidates = _usb.passthrough_candidates(self.devices)

    def lookup(self, name_or_uuid: str) -> Any:
        try:
            handle = _libvirt.lookup_domain(self.conn, name_or_uuid)
            if handle is not None:
                return handle
            names = sorted(domain.name() for domain in self.conn.listAllDomains(0))
        except _libvirt.libvirt.libvirtError as error:
            raise PassthroughError("Cannot look up domain %r at %s: %s" % (name_or_uuid, self.uri, _libvirt.error_message(error)))
        raise PassthroughError("Unknown domain %r at %s; its domains: %s" % (name_or_uuid, self.uri, ", ".join(names) or "none"))

    def load_domains(self) -> None:
        domains = []
        try:
            handles = self.conn.listAllDomains(0)
        except _libvirt.libvirt.libvirtError as error:
            raise PassthroughError("Cannot list the domains at %s: %s" % (self.uri, _libvirt.error_message(error)))
        for handle in handles:
            try:
                domains.append(load_domain(handle))
            except _libvirt.libvirt.libvirtError as error:
                if error.get_error_code() != _libvirt.libvirt.VIR_ERR_NO_DOMAIN:
                    raise PassthroughError("Cannot read domain %s: %s" % (handle.name(), _libvirt.error_message(error)))
        self.domains = domains

    def domain_by_uuid(self, uuid: str) -> Domain:
        for domain in self.domains:
            if domain.uuid == uuid:
                return domain
        raise PassthroughError("Domain %s disappeared while it was being changed" % uuid)

    def resolve(self, selectors: list[dict]) -> list[tuple[dict, dict]]:
        resolved = []
        for selector in selectors:
            device = _usb.select_device(self.devices, selector)
            for earlier_selector, earlier in resolved:
                if earlier is device:
                    raise _usb.SelectorError(
                        "Selectors (%s) and (%s) both choose %s"
                        % (_usb.describe_selector(earlier_selector), _usb.describe_selector(selector), device["id"])
                    )
            resolved.append((selector, device))
        return resolved

    def refuse_host_critical(self, devices: list[dict]) -> None:
        table = _mounts.mount_table()
        for device in devices:
            mounts = _mounts.backing_mounts(self.context, device["sys_path"], table)
            if mounts:
                raise PassthroughError(
                    "Device %s backs mounted filesystem(s) of the host: %s. Set allow_host_critical: true to pass it through anyway."
                    % (_usb.describe_device(device), ", ".join(mounts))
                )

    # Which hostdevs stand for which device

    def targets(self, hostdev: dict) -> list[dict]:
        return [device for device in self.candidates if _libvirt.hostdev_matches(hostdev, device)]

    def stands_for(self, hostdev: dict, device: dict, config: Config) -> bool:
        found = self.targets(hostdev)
        if found:
            if device not in found:
                return False
            if len(found) == 1:
                return True
        elif _vendor_product(hostdev) != _vendor_product(device):
            return False
        named = [entry["id"] for entry in config.intent]
        if device["id"] in named:
            return True
        return not any(name[0:9] == device["vendor_device_id"] for name in named)

    def holds(self, config: Config, device: dict) -> bool:
        if any(entry["id"] == device["id"] for entry in config.intent):
            return True
        return any(self.targets(hostdev) and self.stands_for(hostdev, device, config) for hostdev in config.hostdevs)

    def holders(self, device: dict, exclude: Domain | None = None) -> list[tuple[Domain, list[str]]]:
        """``[(domain, [scopes])]`` of the domains holding the device."""
        found = []
        for domain in self.domains:
            if domain is exclude:
                continue
            scopes = [scope for scope in (LIVE, PERSISTENT) if scope in domain.configs and self.holds(domain.configs[scope], device)]
            if scopes:
                found.append((domain, scopes))
        return found

    def wanted_hostdev(self, device: dict, scope: str) -> dict:
        """Live: the exact device. Persistent: vendor:product, with the address only when another
        device of the host has the same vendor:product, and optional so the domain starts without it."""
        hostdev = {"vendor_id": device["vendor_id"], "product_id": device["product_id"], "bus": None, "device": None, "startup_policy": None}
        same = [other for other in self.candidates if _vendor_product(other) == _vendor_product(device)]
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

    def _hostdev_step(self, domain: Domain, scope: str, action: str, hostdev: dict) -> None:
        hostdevs = domain.configs[scope].hostdevs
        if action == "attach":
            hostdevs.append(hostdev)
        else:
            hostdevs.remove(hostdev)
        self.steps.append(Step(domain=domain, scope=scope, action=action, hostdev=hostdev))
        self._touch(domain)

    def bound(self, hostdev: dict, device: dict, scope: str) -> bool:
        """Whether the hostdev designates exactly this device; live, only by its bus/device address
        (a live hostdev without one is what libvirt leaves of an optional device that was absent at start)."""
        if scope == LIVE and (hostdev["bus"] is None or hostdev["device"] is None):
            return False
        return self.targets(hostdev) == [device]

    def plan_attach(self, domain: Domain, scopes: list[str], selector: dict, device: dict) -> None:
        for scope in scopes:
            config = domain.configs[scope]
            standing = [hostdev for hostdev in config.hostdevs if self.stands_for(hostdev, device, config)]
            if not any(self.bound(hostdev, device, scope) for hostdev in standing):
                if standing:
                    # Left by a replug, or too vague to start the domain: re-bind it.
                    self._hostdev_step(domain, scope, "detach", standing[0])
                self._hostdev_step(domain, scope, "attach", self.wanted_hostdev(device, scope))
            entry = {"id": device["id"], "selector": selector}
            intent = config.intent
            for index, existing in enumerate(intent):
                if existing["id"] == device["id"]:
                    intent[index] = entry
                    break
            else:
                intent.append(entry)
            self._touch(domain)

    def plan_exclusive(self, domain: Domain, scopes: list[str], kept: list[dict]) -> None:
        """Take from the domain every USB device it holds other than ``kept``: the hostdevs that stand
        for none of them (stale ones and hand-written ones included) and the other intent entries."""
        kept_ids = [device["id"] for device in kept]
        for scope in scopes:
            config = domain.configs[scope]
            for hostdev in [hostdev for hostdev in config.hostdevs if not any(self.stands_for(hostdev, device, config) for device in kept)]:
                self._hostdev_step(domain, scope, "detach", hostdev)
            remaining = [entry for entry in config.intent if entry["id"] in kept_ids]
            if remaining != config.intent:
                config.intent[:] = remaining
                self._touch(domain)

    def plan_unplugged(self, domain: Domain, scope: str, device: dict) -> None:
        """Take the hostdevs that stand for a device that is not plugged in out of one configuration; the intent stays."""
        config = domain.configs[scope]
        for hostdev in [hostdev for hostdev in config.hostdevs if self.stands_for(hostdev, device, config)]:
            self._hostdev_step(domain, scope, "detach", hostdev)

    def plan_detach(self, domain: Domain, device: dict) -> None:
        for scope, config in domain.configs.items():
            for hostdev in [hostdev for hostdev in config.hostdevs if self.stands_for(hostdev, device, config)]:
                self._hostdev_step(domain, scope, "detach", hostdev)
            kept = [entry for entry in config.intent if entry["id"] != device["id"]]
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
        live = [step for step in self.steps if step.scope == LIVE]
        persistent = [step for step in self.steps if step.scope == PERSISTENT]
        return live + persistent + self._intent_steps()

    def execute(self) -> list[Step]:
        steps = self.ordered_steps()
        if self.check_mode:
            return steps
        done = []
        for step in steps:
            try:
                _carry_out(step)
            except _libvirt.libvirt.libvirtError as error:
                problems = self._undo(done)
                message = "libvirt refused to %s: %s" % (step.describe(), _libvirt.error_message(error))
                if problems:
                    raise PassthroughError(message + ". Undoing the earlier steps failed too, check: " + "; ".join(problems))
                raise PassthroughError(message + (". The earlier steps were undone; nothing was changed." if done else ". Nothing was changed."))
            done.append(step)
        return steps

    def _undo(self, done: list[Step]) -> list[str]:
        problems = []
        for step in reversed(done):
            try:
                _carry_out(step, undo=True)
            except _libvirt.libvirt.libvirtError as error:
                problems.append("%s: %s" % (step.describe(), _libvirt.error_message(error)))
        return problems

    def start(self, domain: Domain) -> None:
        if not self.check_mode:
            try:
                domain.handle.create()
            except _libvirt.libvirt.libvirtError as error:
                raise PassthroughError("The devices are in place, but starting domain %s failed: %s" % (domain.name, _libvirt.error_message(error)))
        domain.state = "running"

    # Reporting

    def device_view(self, device: dict) -> dict:
        view = _usb.public_view(device)
        view["attached_to"] = dict(
            (scope, sorted(domain.name for domain in self.domains if scope in domain.configs and self.holds(domain.configs[scope], device)))
            for scope in (LIVE, PERSISTENT)
        )
        return view

    def diff(self, domains: list[Domain]) -> dict:
        return {
            "before": "".join(_render(domain, domain.before) for domain in domains),
            "after": "".join(_render(domain, domain.configs) for domain in domains),
        }

    def result(self, steps: list[Step], started: list[Domain]) -> dict:
        actions = [step.describe() for step in steps] + ["start %s" % domain.name for domain in started]
        return {"changed": bool(actions), "actions": actions}

    # The two operations

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
        handle = self.lookup(domain_name)
        self.enumerate()
        resolved = self.resolve(selectors)
        if not allow_host_critical:
            self.refuse_host_critical([device for _selector, device in resolved])
        with _maybe_lock(self.check_mode):
            self.load_domains()
            domain = self.domain_by_uuid(handle.UUIDString())
            scopes = self.attach_scopes(domain, persistent)
            for _selector, device in resolved:
                holders = self.holders(device, exclude=domain)
                if holders and not steal:
                    raise PassthroughError(
                        "Device %s is held by %s; one device goes to one VM. Detach it there first, or set steal: true to move it to %s."
                        % (_usb.describe_device(device), _describe_holders(holders), domain.name)
                    )
                for holder, _scopes in holders:
                    self.plan_detach(holder, device)
            if exclusive:
                self.plan_exclusive(domain, scopes, [device for _selector, device in resolved])
            for selector, device in resolved:
                self.plan_attach(domain, scopes, selector, device)
            steps = self.execute()
        started = []
        if auto_start and domain.state not in ("running", "paused"):
            self.start(domain)
            started.append(domain)
        result = self.result(steps, started)
        result["devices"] = [self.device_view(device) for _selector, device in resolved]
        result["domain"] = domain.summary()
        result["diff"] = self.diff(self.touched or [domain])
        return result

    def attach_scopes(self, domain: Domain, persistent: bool) -> list[str]:
        if LIVE in domain.configs:
            return [LIVE, PERSISTENT] if persistent and PERSISTENT in domain.configs else [LIVE]
        if not persistent:
            raise PassthroughError(
                "persistent: false attaches to the running domain only, and domain %s is %s. Start it first, or leave persistent at true."
                % (domain.name, domain.state)
            )
        return [PERSISTENT]

    def detach(self, domain_name: str | None, selectors: list[dict], auto_start: bool = False) -> dict:
        handle = self.lookup(domain_name) if domain_name else None
        self.enumerate()
        present = []
        absent = []
        for selector in selectors:
            if any(_usb.selector_matches(selector, device) for device in self.devices):
                present.append(_usb.select_device(self.devices, selector))
            else:
                absent.append(selector)
        with _maybe_lock(self.check_mode):
            self.load_domains()
            domains = [self.domain_by_uuid(handle.UUIDString())] if handle else self.domains
            for device in present:
                for domain in domains:
                    if handle or any(self.holds(config, device) for config in domain.configs.values()):
                        self.plan_detach(domain, device)
            for selector in absent:
                for domain, device in self.intended_absent(domains, selector):
                    self.plan_detach(domain, device)
            steps = self.execute()
        started = []
        if auto_start:
            for domain in [self.domain_by_uuid(handle.UUIDString())] if handle else self.touched:
                if domain.state not in ("running", "paused"):
                    self.start(domain)
                    started.append(domain)
        result = self.result(steps, started)
        result["devices"] = [self.device_view(device) for device in present]
        result["domain"] = self.domain_by_uuid(handle.UUIDString()).summary() if handle else None
        result["domains"] = [domain.summary() for domain in self.touched]
        shown = self.touched or ([self.domain_by_uuid(handle.UUIDString())] if handle else [])
        result["diff"] = self.diff(shown)
        return result

    def intended_absent(self, domains: list[Domain], selector: dict) -> list[tuple[Domain, dict]]:
        """For a selector that matches no present device: the domains whose intent names it, and the device it named."""
        found = []
        for domain in domains:
            for config in domain.configs.values():
                for entry in config.intent:
                    if entry["id"] == selector.get("id") or entry["selector"] == selector:
                        pair = (domain, absent_device(entry["id"]))
                        if pair not in found:
                            found.append(pair)
        if not found:
            # Nothing names it either: the ordinary "no device matches" error, with what the host has.
            _usb.select_device(self.devices, selector)
        return found


def _maybe_lock(check_mode: bool) -> Any:
    return contextlib.nullcontext() if check_mode else host_lock()


def _describe_holders(holders: list[tuple[Domain, list[str]]]) -> str:
    return ", ".join("domain %s (%s)" % (domain.name, ", ".join(scopes)) for domain, scopes in holders)


def _carry_out(step: Step, undo: bool = False) -> None:
    libvirt = _libvirt.libvirt
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if step.scope == LIVE else libvirt.VIR_DOMAIN_AFFECT_CONFIG
    handle = step.domain.handle
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
