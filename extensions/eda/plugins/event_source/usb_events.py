# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""usb_events.py: an ansible-rulebook event source that follows the USB events of KVM hosts over SSH.

Each host's own program, ``kvmhost-usb events --follow``, prints its events as JSON lines; this source runs it over
``ssh`` on every host of an Ansible inventory at once and puts each event on the queue unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ansible.inventory.manager import InventoryManager
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar
from ansible.vars.manager import VariableManager

try:
    from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import device_fields, normalize_selector
    from ansible_collections.kvmhost.usb.plugins.module_utils._usb import selector_matches
except ImportError:
    # ansible-rulebook runs a source by its path, with no ansible_collections on sys.path: the tree this file is in
    # goes there (Ansible's own collection loader would do, but its path hook claims ansible_rulebook's files too,
    # and ansible-rulebook then fails to load its event filters).
    _MARK = os.sep + "ansible_collections" + os.sep
    _HERE = os.path.abspath(__file__)
    if _MARK not in _HERE:
        raise
    sys.path.append(_HERE.split(_MARK)[0])
    from ansible_collections.kvmhost.usb.plugins.module_utils._declaration import device_fields, normalize_selector
    from ansible_collections.kvmhost.usb.plugins.module_utils._usb import selector_matches

DOCUMENTATION = r"""
---
short_description: Follow the USB events of KVM hosts over SSH.
description:
  - An ansible-rulebook event source that follows C(kvmhost-usb events --follow), the host runtime's event stream,
    on each KVM host of an Ansible inventory, over SSH as Ansible reaches the host (no port opened on the hosts).
  - Each event is put on the queue as the host runtime printed it, a dict with C(kind), C(host), C(seq) (per host,
    strictly increasing), C(time) (ISO 8601) and, where it applies, C(device) (the fields of a usb_facts device),
    C(domain), C(by), C(seconds), C(peer) and C(reason).
  - Kinds are C(added), C(removed), C(attached), C(detached), C(missing), C(given_back), C(refused), C(link_down),
    C(link_up) and C(migrated).
  - The hosts are followed at once, one SSH session each. A session that closes or fails is opened again after a
    wait that doubles from O(delay) up to O(max_delay) (back to O(delay) after a session that gave an event or lasted
    five minutes), with
    C(--since) the last sequence number taken, so no event is missed or given twice.
  - Before following, the source checks its arguments and that each host has the runtime (C(kvmhost-usb version));
    it fails with a clear message for an unknown kind, a malformed selector, a pattern no host matches or a host
    without the runtime. A host that cannot be reached at start is followed all the same, retried as above.
options:
  inventory:
    description:
      - The path of an Ansible inventory (a file or a directory); its group_vars and host_vars are honoured.
      - Each host is reached as Ansible's ssh connection would, with its C(ansible_host), C(ansible_port),
        C(ansible_user), C(ansible_ssh_private_key_file) and C(ansible_ssh_common_args), in batch mode.
    type: str
    required: true
  limit:
    description: An Ansible host pattern choosing the hosts to follow.
    type: str
    default: all
  kinds:
    description: The kinds of event wanted; all kinds when not given.
    type: list
    elements: str
  selector:
    description:
      - Only events about the devices this selector chooses (or any of a list of selectors); events without a device
        are dropped when it is given.
      - A selector of usb_attach, a dict of C(id), C(vendor_id), C(product_id), C(serial), C(port), C(address), or a
        string (an id, C(vvvv:pppp), C(BBB:DDD) or a port path). With C(host), only that inventory host's events.
    type: raw
  domain:
    description: Only events about this domain (libvirt domain name); events without a domain are dropped when given.
    type: str
  history:
    description:
      - Whether the events a host still keeps from before the source started are given too. By default only those
        that happen from the start on are.
    type: bool
    default: false
  delay:
    description: The first wait in seconds before a closed or failed session is opened again.
    type: float
    default: 1
  max_delay:
    description: The longest wait in seconds between two attempts.
    type: float
    default: 60
  keepalive:
    description:
      - Seconds of silence after which ssh checks that the host still answers (C(ServerAliveInterval)); after three
        unanswered checks the session counts as failed.
    type: int
    default: 15
  connect_timeout:
    description: Seconds ssh waits for a host to answer a new connection (C(ConnectTimeout)).
    type: int
    default: 10
notes:
  - Needs the C(ssh) client on the PATH of ansible-rulebook, the keys to reach the hosts without a password, and on
    each host the runtime that the role kvmhost.usb.passthrough (or the module kvmhost.usb.usb_runtime) installs.
"""

EXAMPLES = r"""
- name: Converge a host when a device is plugged in
  hosts: all
  sources:
    - name: USB events of the KVM hosts
      kvmhost.usb.usb_events:
        inventory: inventory/hosts.yml
        limit: kvm
        kinds: [added]
  rules:
    - name: Converge on plug-in
      condition: event.kind == "added"
      action:
        run_playbook:
          name: kvmhost.usb.converge
          extra_vars:
            usb_hosts: "{{ event.host }}"

- name: Watch one dongle wherever it is plugged in
  hosts: all
  sources:
    - kvmhost.usb.usb_events:
        inventory: inventory/hosts.yml
        kinds: [missing, added, removed]
        selector: {vendor_id: "0529", product_id: "0001", serial: "1A2B3C"}
        delay: 2
        max_delay: 120
  rules:
    - name: Say it
      condition: event.kind is defined
      action:
        debug:
          msg: "{{ event.host }}: {{ event.kind }} {{ event.device.id }}"
"""

KINDS = ("added", "removed", "attached", "detached", "missing", "given_back", "refused", "link_down", "link_up", "migrated")
RUNTIME = "kvmhost-usb"
# What a shell answers for a command it cannot find; what ssh answers for its own failures.
NOT_FOUND = 127
SSH_FAILED = 255
# What kvmhost-usb events answers for a --since newer than anything the host gave (its history restarted).
REFUSED = 2
# The longest line read from a host; a longer one ends the session.
LINE_LIMIT = 1 << 20
# A session that gave no event is healthy (the wait before the next one back to delay) when it lasted this long.
HEALTHY_AFTER = 300

logger = logging.getLogger("kvmhost.usb.usb_events")


@dataclass
class Settings:
    """The source's arguments, checked."""

    inventory: str
    limit: str = "all"
    kinds: tuple = ()
    selectors: list = field(default_factory=list)
    domain: str | None = None
    history: bool = False
    delay: float = 1.0
    max_delay: float = 60.0
    keepalive: int = 15
    connect_timeout: int = 10


def settings_of(args: dict[str, Any]) -> Settings:
    """The arguments checked; ValueError naming the first wrong one."""
    inventory = args.get("inventory")
    if not inventory:
        raise ValueError("usb_events: 'inventory' (the path of an Ansible inventory) is required")
    if not os.path.exists(str(inventory)):
        raise ValueError("usb_events: inventory %s does not exist" % inventory)
    kinds = args.get("kinds") or []
    if isinstance(kinds, str):
        kinds = [kind.strip() for kind in kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError("usb_events: unknown kind(s) %s in 'kinds'; known kinds: %s" % (", ".join(map(str, unknown)), ", ".join(KINDS)))
    selector = args.get("selector")
    selectors = selector if isinstance(selector, list) else [selector] if selector else []
    try:
        selectors = [normalize_selector(item) for item in selectors]
    except ValueError as error:
        raise ValueError("usb_events: selector: %s" % error) from None
    delay, max_delay = float(args.get("delay", 1)), float(args.get("max_delay", 60))
    if not 0 < delay <= max_delay:
        raise ValueError("usb_events: 'delay' (%s) must be above 0 and at most 'max_delay' (%s)" % (delay, max_delay))
    return Settings(
        inventory=str(inventory),
        limit=str(args.get("limit") or "all"),
        kinds=tuple(kinds),
        selectors=selectors,
        domain=str(args["domain"]) if args.get("domain") else None,
        history=bool(args.get("history", False)),
        delay=delay,
        max_delay=max_delay,
        keepalive=int(args.get("keepalive", 15)),
        connect_timeout=int(args.get("connect_timeout", 10)),
    )


@dataclass
class Host:
    """A host to follow: its inventory name and the ssh command line that reaches it, up to the remote command."""

    name: str
    ssh: list


def ssh_command(name: str, variables: dict, settings: Settings) -> list:
    """ssh as Ansible's connection reaches the host. ssh takes the first value given for an option: batch mode comes
    first (never a password prompt), the inventory's common args next, so they may change the keepalive and timeout."""
    command = ["ssh", "-T", "-o", "BatchMode=yes"]
    if variables.get("ansible_port"):
        command += ["-p", str(variables["ansible_port"])]
    if variables.get("ansible_user"):
        command += ["-l", str(variables["ansible_user"])]
    if variables.get("ansible_ssh_private_key_file"):
        command += ["-i", os.path.expanduser(str(variables["ansible_ssh_private_key_file"]))]
    command += shlex.split(str(variables.get("ansible_ssh_common_args") or ""))
    command += ["-o", "ServerAliveInterval=%d" % settings.keepalive, "-o", "ServerAliveCountMax=3"]
    command += ["-o", "ConnectTimeout=%d" % settings.connect_timeout]
    return command + ["--", str(variables.get("ansible_host") or name)]


def load_hosts(settings: Settings) -> list[Host]:
    """The hosts of the inventory that ``limit`` matches, each with its ssh command; ValueError when none does."""
    loader = DataLoader()
    inventory = InventoryManager(loader=loader, sources=[settings.inventory])
    variable_manager = VariableManager(loader=loader, inventory=inventory)
    hosts = []
    for host in inventory.get_hosts(settings.limit):
        variables = variable_manager.get_vars(host=host)
        templar = Templar(loader=loader, variables=variables)
        wanted = ("ansible_host", "ansible_port", "ansible_user", "ansible_ssh_private_key_file", "ansible_ssh_common_args")
        reach = dict((name, templar.template(variables.get(name))) for name in wanted)
        hosts.append(Host(host.name, ssh_command(host.name, reach, settings)))
    if not hosts:
        raise ValueError("usb_events: no host of inventory %s matches %r" % (settings.inventory, settings.limit))
    return hosts


def follow_command(last: int | None, kinds: tuple) -> list:
    command = [RUNTIME, "events", "--follow"]
    if last is not None:
        command += ["--since", str(last)]
    if kinds:
        command += ["--kinds", ",".join(kinds)]
    return command


def parse_line(host: str, line: bytes | str) -> dict | None:
    """The event a line holds; None (logged) for a line that is not a JSON object with an integer seq."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text:
        return None
    try:
        event = json.loads(text)
    except ValueError:
        event, why = None, "not JSON"
    else:
        why = "not an object" if not isinstance(event, dict) else "no integer seq"
    if isinstance(event, dict) and isinstance(event.get("seq"), int) and not isinstance(event.get("seq"), bool):
        return event
    logger.warning("%s: skipped a malformed line of kvmhost-usb events (%s): %.200r", host, why, text)
    return None


def wanted(event: dict, host: str, settings: Settings) -> bool:
    """Whether the event passes the kinds, domain and selector filters."""
    if settings.kinds and event.get("kind") not in settings.kinds:
        return False
    if settings.domain and event.get("domain") != settings.domain:
        return False
    if settings.selectors:
        device = event.get("device")
        if not isinstance(device, dict):
            return False
        return any(selector.get("host", host) == host and selector_matches(device_fields(selector), device) for selector in settings.selectors)
    return True


async def run_once(command: list, timeout: float) -> tuple:
    """Run a command to its end: (exit code, stdout, stderr); exit code None when it took longer than ``timeout``."""
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        return None, b"", b"no answer within %d s" % timeout
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return process.returncode, stdout, stderr


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()[-500:]


async def check_runtimes(hosts: list[Host], settings: Settings) -> None:
    """ValueError naming the hosts without the runtime; a host that cannot be reached now is only logged."""
    timeout = settings.connect_timeout + 20
    results = await asyncio.gather(*(run_once(host.ssh + [RUNTIME, "version"], timeout) for host in hosts))
    missing = []
    for host, (code, stdout, stderr) in zip(hosts, results):
        if code == 0:
            logger.info("%s: %s", host.name, _text(stdout))
        elif code == NOT_FOUND or (code != SSH_FAILED and b"not found" in stderr):
            missing.append(host.name)
        else:
            logger.warning("%s: cannot check the runtime now (exit %s: %s); following it all the same", host.name, code, _text(stderr))
    if missing:
        raise ValueError(
            "usb_events: %s lack(s) the host runtime kvmhost-usb: run the role kvmhost.usb.passthrough (or the module "
            "kvmhost.usb.usb_runtime) on it first" % ", ".join(missing)
        )


class Follower:
    """One host's events: its sessions one after the other, the last seq taken, the wait before the next session."""

    def __init__(self, host: Host, queue: asyncio.Queue, settings: Settings):
        self.host = host
        self.queue = queue
        self.settings = settings
        self.last: int | None = None
        # Without history, the first session starts where the host's events stand at start (position()).
        self.positioned = settings.history
        self.delay = settings.delay

    async def run(self) -> None:
        while True:
            healthy = False
            if not self.positioned:
                await self.position()
            if self.positioned:
                healthy = await self.session()
            if healthy:
                self.delay = self.settings.delay
            logger.info("%s: reconnecting in %.3g s", self.host.name, self.delay)
            await asyncio.sleep(self.delay)
            if not healthy:
                self.delay = min(self.delay * 2, self.settings.max_delay)

    async def position(self) -> None:
        """The last seq the host gave so far, from its events without --follow."""
        code, stdout, stderr = await run_once(self.host.ssh + [RUNTIME, "events"], self.settings.connect_timeout + 60)
        if code != 0:
            logger.warning("%s: cannot read its events (exit %s: %s)", self.host.name, code, _text(stderr))
            return
        seqs = [event["seq"] for event in map(lambda line: parse_line(self.host.name, line), stdout.splitlines()) if event]
        self.last = max(seqs) if seqs else None
        self.positioned = True
        logger.info("%s: following its events after seq %s", self.host.name, self.last)

    async def session(self) -> bool:
        """One ssh session of kvmhost-usb events --follow, to its end; whether it was healthy (gave an event, or
        lasted HEALTHY_AFTER seconds)."""
        command = self.host.ssh + follow_command(self.last, self.settings.kinds)
        since = self.last
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=LINE_LIMIT
        )
        errors = asyncio.ensure_future(process.stderr.read())
        gave = ended = False
        try:
            while True:
                try:
                    line = await process.stdout.readline()
                except ValueError:
                    logger.warning("%s: a line of kvmhost-usb events is longer than %d bytes; closing the session", self.host.name, LINE_LIMIT)
                    break
                if not line:
                    ended = True
                    break
                event = parse_line(self.host.name, line)
                if event is None:
                    continue
                gave = True
                await self.take(event)
        finally:
            # Killed only when it may still run: kill() reaps a process that has just ended, before asyncio's own
            # wait for it does, and then the exit code is lost.
            if not ended and process.returncode is None:
                process.kill()
            code = await process.wait()
            stderr = await errors
        logger.warning("%s: kvmhost-usb events ended (exit %s: %s)", self.host.name, code, _text(stderr) or "no message")
        if code == REFUSED and since is not None and not gave:
            # The host no longer knows our last seq (its runtime's history restarted): every event it keeps is new.
            logger.warning("%s: it has no event after seq %s any more; taking every event it keeps", self.host.name, since)
            self.last = None
        return gave or time.monotonic() - started >= HEALTHY_AFTER

    async def take(self, event: dict) -> None:
        """The event on the queue unless it was taken before or is filtered out; either way the last seq moves on."""
        if self.last is not None and event["seq"] <= self.last:
            logger.debug("%s: dropped seq %s, already taken", self.host.name, event["seq"])
            return
        self.last = event["seq"]
        if wanted(event, self.host.name, self.settings):
            await self.queue.put(event)


async def main(queue: asyncio.Queue, args: dict[str, Any]) -> None:
    """Follow the USB events of the inventory's hosts and put each on ``queue``; ValueError for wrong arguments, a
    pattern matching no host and hosts without the runtime, before following."""
    settings = settings_of(args)
    hosts = load_hosts(settings)
    try:
        await check_runtimes(hosts, settings)
    except FileNotFoundError:
        raise ValueError("usb_events: no ssh client on the PATH (Debian: openssh-client)") from None
    logger.info("following the USB events of %s", ", ".join(host.name for host in hosts))
    followers = [asyncio.ensure_future(Follower(host, queue, settings).run()) for host in hosts]
    try:
        await asyncio.gather(*followers)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)


if __name__ == "__main__":
    # Run directly, the events are printed: python usb_events.py INVENTORY [LIMIT]
    class MockQueue(asyncio.Queue):
        """A queue that prints what is put on it."""

        async def put(self, item: dict) -> None:
            print(json.dumps(item))  # noqa: T201

    logging.basicConfig(level=logging.INFO)
    asyncio.run(main(MockQueue(), {"inventory": sys.argv[1], "limit": sys.argv[2] if len(sys.argv) > 2 else "all"}))
