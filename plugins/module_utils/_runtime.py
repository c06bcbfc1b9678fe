# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The host runtime ``kvmhost-usb``: the one program a KVM host runs between converges.

``kvmhost-usb agent`` is the reattach agent (service ``kvmhost-usb-agent``), ``kvmhost-usb exporter`` the USB/IP
exporter (service ``kvmhost-usb-exporter``), ``kvmhost-usb link up|down`` the WireGuard link to the hosts it shares
devices with (service ``kvmhost-usb-link``), ``kvmhost-usb status`` says what the host holds, exports and imports and
how both services are, ``kvmhost-usb version`` the collection version and build hash the program was built from.

``kvmhost-usb events [--since SEQ] [--follow] [--kinds K1,K2]`` prints the host's events (``_events``: devices added
and removed, attached and detached and by whom, missing, given back, refused imports and exports, the link down and up,
domains migrated), one JSON object a line, each with ``seq`` (per host, increasing, never reused), ``time``, ``host``
and ``kind``: the kept ones after SEQ (all kept without it), then with ``--follow`` each new one as it comes. Exit 2
for an unknown kind or a SEQ after the last event the host recorded; 1 when the store cannot be read.

The module usb_runtime builds it from the collection's own module_utils (``_runtime_install``) as one zipapp; the
build's version and hash reach ``main`` from the zipapp's ``__main__``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from ansible_collections.kvmhost.usb.plugins.module_utils import _agent, _events, _facts, _link, _usb, _version
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import exporter

SERVICES = {"agent": "kvmhost-usb-agent.service", "exporter": "kvmhost-usb-exporter.service", "link": "kvmhost-usb-link.service"}
SERVICE_PROPERTIES = ("ActiveState", "SubState", "MainPID", "NRestarts", "UnitFileState")


def service_states(systemctl: str = "systemctl") -> dict:
    """``{agent: {ActiveState, ...}, exporter: {...}}`` from systemd; ``{"ActiveState": "unknown"}`` without it."""
    states = {}
    for role, unit in SERVICES.items():
        try:
            shown = subprocess.run(
                [systemctl, "show", "--property=" + ",".join(SERVICE_PROPERTIES), unit],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            states[role] = {"ActiveState": "unknown"}
            continue
        states[role] = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    return states


def events_status() -> dict:
    """``{"last": the last event's number, "kept": how many the store keeps}`` (0 and 0 before the first)."""
    try:
        state = _events.Store().state()
    except OSError:
        return {"last": None, "kept": None}
    return {"last": state["last"], "kept": state["lines"]}


def status(uri: str, build: dict) -> dict:
    host = _facts.gather(uri)
    attached = []
    exports = []
    imports = []
    for device in host["devices"]:
        what = dict(id=device["id"], port=device["port"], product=device.get("product"))
        domains = sorted(set(device["attached_to"].get("live", []) + device["attached_to"].get("persistent", [])))
        if domains:
            attached.append(dict(what, domains=domains, live=device["attached_to"].get("live", [])))
        if device.get("exported_to"):
            exports.append(dict(what, **device["exported_to"]))
        if device.get("imported_from"):
            imports.append(dict(what, **device["imported_from"]))
    return dict(
        version=build.get("version"),
        hash=build.get("hash"),
        services=service_states(),
        attached=attached,
        exports=exports,
        imports=imports,
        link=_link.status(),
        events=events_status(),
        warnings=host["warnings"],
    )


def _service_line(role: str, state: dict) -> str:
    line = "%-9s %s" % (role, state.get("ActiveState", "unknown"))
    if state.get("SubState"):
        line += " (%s)" % state["SubState"]
    if state.get("MainPID") not in (None, "0"):
        line += ", pid %s" % state["MainPID"]
    if state.get("NRestarts") not in (None, "0"):
        line += ", %s restarts" % state["NRestarts"]
    if state.get("UnitFileState") in (None, ""):
        line += ", not installed" if state.get("ActiveState") == "inactive" else ""
    return line


def _handshake(when: int) -> str:
    return "handshake at %s" % time.strftime("%H:%M:%S", time.localtime(when)) if when else "no handshake yet"


def status_lines(report: dict) -> list[str]:
    lines = ["kvmhost-usb %s (build %s)" % (report["version"], (report["hash"] or "unknown")[:12])]
    lines += [_service_line(role, report["services"][role]) for role in SERVICES]
    for item in report["attached"]:
        live = " (live)" if item["live"] else " (persistent only)"
        lines.append("attached  %s at %s to %s%s" % (item["id"], item["port"], ", ".join(item["domains"]), live))
    for item in report["exports"]:
        lines.append("export    %s at %s to %s (%s) for %s" % (item["id"], item["port"], item.get("host"), item.get("address"), item.get("domain")))
    for item in report["imports"]:
        lines.append("import    %s at %s from %s (%s) bus id %s" % (item["id"], item["port"], item.get("host"), item.get("link_address"), item.get("busid")))
    link = report.get("link")
    if link:
        peers = ", ".join(
            "%s (%s, %s)" % (peer["name"], peer["tunnel_address"], _handshake(peer["handshake"])) for peer in link["peers"]
        )
        lines.append("link      %s %s to %s" % (link["interface"], link["address"], peers or "no peer"))
    events = report.get("events") or {}
    if events.get("last") is not None:
        lines.append("events    last seq %d (%d kept; kvmhost-usb events)" % (events["last"], events["kept"]))
    if not (report["attached"] or report["exports"] or report["imports"]):
        lines.append("no device attached, exported or imported")
    lines += ["warning   %s" % warning for warning in report["warnings"]]
    return lines


def main(argv: list[str] | None = None, build: dict | None = None) -> int:
    build = build or {"version": _version.COLLECTION_VERSION, "hash": None}
    parser = argparse.ArgumentParser(prog="kvmhost-usb", description=__doc__.split("\n\n", maxsplit=1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("agent", help="run the reattach agent (kvmhost-usb agent --help)", add_help=False)
    commands.add_parser("exporter", help="the USB/IP exporter: serve, list, imports (kvmhost-usb exporter --help)", add_help=False)
    commands.add_parser("link", help="set up (up) or take down (down) the WireGuard link as /etc/kvmhost-usb/link.json says", add_help=False)
    shown = commands.add_parser("status", help="what this host holds, exports and imports, and how its services are")
    shown.add_argument("--uri", default="qemu:///system", help="libvirt URI (default: %(default)s)")
    shown.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    commands.add_parser("events", help="this host's events, one JSON object a line (kvmhost-usb events --help)", add_help=False)
    commands.add_parser("version", help="the collection version and build hash of this program")
    args, rest = parser.parse_known_args(argv)
    if args.command == "agent":
        return _agent.main(rest)
    if args.command == "exporter":
        return exporter.main(rest)
    if args.command == "link":
        return _link.main(rest)
    if args.command == "events":
        return _events.main(rest)
    if rest:
        parser.error("unrecognized arguments: %s" % " ".join(rest))
    if args.command == "version":
        sys.stdout.write("kvmhost-usb %s %s\n" % (build["version"], build["hash"] or "unknown"))
        return 0
    if _usb.pyudev is None:
        sys.stderr.write("kvmhost-usb status needs %s\n" % _usb.PYUDEV_REQUIREMENT)
        return 2
    report = status(args.uri, build)
    if args.json:
        sys.stdout.write(json.dumps(report, sort_keys=True) + "\n")
    else:
        sys.stdout.write("\n".join(status_lines(report)) + "\n")
    return 0
