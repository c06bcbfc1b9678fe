# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Build the host runtime from the collection's own code and install it: one zipapp, its systemd units, its kernel
modules at boot, and the services restarted only when their program or unit changed.

The zipapp holds ``_runtime`` and every module_utils file it imports, found by reading their imports (``closure``), so
a file the runtime comes to need is packed without a list to keep. The module usb_runtime runs on the host with the
same files in its own payload: the program it writes and the module that wrote it are of one version by construction.
Its hash is over the packed sources alone, so the same collection builds the same program on every host.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
import os
import zipfile

from dataclasses import dataclass, field

from ansible_collections.kvmhost.usb.plugins.module_utils import _events, _link, _runtime, _version

PACKAGE = "ansible_collections.kvmhost.usb.plugins.module_utils"
ENTRY = PACKAGE + "._runtime"
PYTHON = "/usr/bin/python3"
PROGRAM = "/usr/lib/kvmhost-usb/kvmhost-usb.pyz"
COMMAND = "/usr/local/bin/kvmhost-usb"
UNIT_DIR = "/etc/systemd/system"
MODULES_LOAD_DIR = "/etc/modules-load.d"
# The agent's code as the role copied it before the runtime was one program: removed on install.
OLD_TREE = "/usr/local/lib/kvmhost-usb"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class RuntimeBuildError(Exception):
    """The runtime cannot be built from this collection (a module it needs is missing from the payload)."""


def imported(name: str, source: str, is_package: bool) -> set:
    """The collection's module_utils modules that ``source`` (of module ``name``) imports."""
    found = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE + "."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            if base != PACKAGE:
                found.add(base)
            # `from package import name`: name is a module when a spec finds one.
            found.update(base + "." + alias.name for alias in node.names if _is_module(base + "." + alias.name))
    return found


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError):
        return False  # a name inside a module, not a module of its own


def closure(entry: str = ENTRY) -> dict:
    """``{path in the zip: source}`` of ``entry`` and every module_utils module it imports, directly or not."""
    files = {}
    todo = [entry]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            raise RuntimeBuildError("The host runtime needs %s, which this copy of the collection lacks" % name)
        source = spec.loader.get_source(name)
        is_package = spec.submodule_search_locations is not None
        files[name.replace(".", "/") + ("/__init__.py" if is_package else ".py")] = source
        parts = name.split(".")
        todo.extend(".".join(parts[:index]) for index in range(len(PACKAGE.split(".")) + 1, len(parts)))
        todo.extend(imported(name, source, is_package))
    for index in range(1, len(PACKAGE.split(".")) + 1):
        files.setdefault("/".join(PACKAGE.split(".")[:index]) + "/__init__.py", "")
    return files


def build_hash(files: dict) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.encode() + b"\0" + files[path].encode() + b"\0")
    return digest.hexdigest()


MAIN = '''import sys

from ansible_collections.kvmhost.usb.plugins.module_utils import _runtime

sys.exit(_runtime.main(sys.argv[1:], build={"version": %r, "hash": %r}))
'''


@dataclass
class Build:
    version: str
    hash: str
    content: bytes
    files: list = field(default_factory=list)


def build(python: str = PYTHON) -> Build:
    """The zipapp, byte for byte the same for the same sources: stored, sorted, with fixed times."""
    files = closure()
    digest = build_hash(files)
    files["__main__.py"] = MAIN % (_version.COLLECTION_VERSION, digest)
    out = io.BytesIO()
    out.write(("#!%s\n" % python).encode())
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[path])
    return Build(_version.COLLECTION_VERSION, digest, out.getvalue(), sorted(files))


# The units. Both run as root only because libvirt's qemu:///system socket and sysfs's USB/IP files admit root; they
# keep no capability and see the least of the host that their work allows.
HARDENING = """CapabilityBoundingSet={capabilities}
AmbientCapabilities={capabilities}
NoNewPrivileges=yes
ProtectSystem=strict
{writable}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
DevicePolicy=closed
PrivateIPC=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
{network}
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
UMask={umask}
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""

AGENT_UNIT = """# Installed by kvmhost.usb.usb_runtime (kvmhost-usb {version}, build {short}); changes here are overwritten.
[Unit]
Description=kvmhost.usb agent: keeps declared USB passthrough attached across unplug, replug and domain start
After=systemd-udevd.service libvirtd.service libvirtd.socket virtqemud.socket kvmhost-usb-link.service

[Service]
Type=simple
ExecStart={python} {program} agent --uri {uri} --period {period} --missing-after {missing_after}
Restart=always
RestartSec=2
StateDirectory=kvmhost-usb
{importer}
# It talks to udev (netlink) and libvirt (unix socket), reads /sys and /run/udev, and writes nothing but the host lock
# the modules share (/run/lock/kvmhost-usb.lock) and the host's events (/var/lib/kvmhost-usb); a host that imports
# devices over USB/IP also reaches the exporting hosts' link addresses (TCP) and writes vhci-hcd's attach and detach
# files. On a linked host it reads its WireGuard peers' latest handshakes (wg show, which needs CAP_NET_ADMIN).
"""

AGENT_IMPORTER = """# This host imports devices over USB/IP: vhci-hcd, loaded with full privileges before the sandbox applies, and the
# import records in /run/kvmhost-usb/imports.
ExecStartPre=+/sbin/modprobe vhci-hcd
RuntimeDirectory=kvmhost-usb
RuntimeDirectoryPreserve=yes
"""

EXPORTER_UNIT = """# Installed by kvmhost.usb.usb_runtime (kvmhost-usb {version}, build {short}); changes here are overwritten.
[Unit]
Description=kvmhost.usb exporter: offers this host's exported USB devices over USB/IP to their importing host only
After=systemd-udevd.service network-online.target kvmhost-usb-link.service
Wants=network-online.target

[Service]
# Ready once it listens: `systemctl restart` returns then, so an importer's next task finds it serving.
Type=notify
NotifyAccess=main
ExecStartPre=+/sbin/modprobe usbip-host
ExecStart={python} {program} exporter serve
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=2
RuntimeDirectory=kvmhost-usb
RuntimeDirectoryPreserve=yes
StateDirectory=kvmhost-usb

# TCP on the tunnel address (the link address without encryption), and writes to sysfs (usbip-host's bind, unbind and match_busid, a device's usbip_sockfd,
# drivers_probe). It reads /etc/kvmhost-usb/exports.json (and drops an export from it when its importer gives the
# device back) and writes /run/kvmhost-usb/exported.json and its refusals to the host's events (/var/lib/kvmhost-usb).
"""


# The link is set up by usb_runtime itself (its errors are clearer there); the unit sets it up again at boot, before the
# exporter and the agent, and takes it down when stopped. It needs what the others do without: network administration.
LINK_UNIT = """# Installed by kvmhost.usb.usb_runtime (kvmhost-usb {version}, build {short}); changes here are overwritten.
[Unit]
Description=kvmhost.usb link: the WireGuard tunnel to the hosts this host shares USB devices with
After=network-online.target
Wants=network-online.target
Before=kvmhost-usb-exporter.service kvmhost-usb-agent.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={python} {program} link up
ExecStop={python} {program} link down

[Install]
WantedBy=multi-user.target
"""


def link_unit(program: Build, python: str = PYTHON, path: str = PROGRAM) -> str:
    return LINK_UNIT.format(version=program.version, short=program.hash[:12], python=python, program=path)


def agent_unit(
    program: Build, uri: str, period: float, import_addresses: list, python: str = PYTHON, path: str = PROGRAM,
    missing_after: float = 300, linked: bool = False,
) -> str:
    if import_addresses:
        writable = "ReadWritePaths=/run/lock\nReadWritePaths=/sys/devices/platform"
        network = "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6\nIPAddressDeny=any\nIPAddressAllow=%s" % " ".join(import_addresses)
    else:
        writable = "ReadWritePaths=/run/lock"
        network = "RestrictAddressFamilies=AF_UNIX AF_NETLINK\nIPAddressDeny=any"
    head = AGENT_UNIT.format(
        version=program.version, short=program.hash[:12], python=python, program=path, uri=uri, period=_number(period),
        importer=AGENT_IMPORTER if import_addresses else "", missing_after=_number(missing_after),
    )
    capabilities = "CAP_NET_ADMIN" if linked else ""
    return head + "\n" + HARDENING.format(writable=writable, network=network, umask="0077", capabilities=capabilities)


def exporter_unit(program: Build, python: str = PYTHON, path: str = PROGRAM) -> str:
    head = EXPORTER_UNIT.format(version=program.version, short=program.hash[:12], python=python, program=path)
    return head + "\n" + HARDENING.format(
        writable="ReadWritePaths=/sys/bus/usb /sys/devices -/etc/kvmhost-usb",
        network="RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
        umask="0022",
        capabilities="",
    )


def _number(value: float) -> str:
    return ("%d" % value) if float(value).is_integer() else ("%s" % value)


@dataclass
class File:
    """A file the runtime owns: ``content`` None means it must not exist; ``link`` makes it a symlink to that path."""

    path: str
    content: bytes | None
    mode: int = 0o644
    link: str | None = None

    def current(self, root: str) -> bytes | str | None:
        where = root + self.path
        if os.path.islink(where):
            return "link:" + os.readlink(where)
        if not os.path.exists(where):
            return None
        with open(where, "rb") as handle:
            return handle.read()

    def wanted(self) -> bytes | str | None:
        return ("link:" + self.link) if self.link else self.content

    def write(self, root: str) -> None:
        where = root + self.path
        os.makedirs(os.path.dirname(where), mode=0o755, exist_ok=True)
        if os.path.lexists(where) and (self.link or os.path.islink(where)):
            os.unlink(where)
        if self.link:
            os.symlink(self.link, where)
            return
        temporary = where + ".kvmhost-usb-new"
        with open(temporary, "wb") as handle:
            handle.write(self.content)
        os.chmod(temporary, self.mode)
        os.replace(temporary, where)

    def remove(self, root: str) -> None:
        if os.path.lexists(root + self.path):
            os.unlink(root + self.path)


def events_settings(backlog: int = _events.BACKLOG, host: str | None = None) -> dict:
    """What /etc/kvmhost-usb/events.json holds (``_events.read_settings``): the events kept, and the host's name in them."""
    settings = {"backlog": int(backlog)}
    if host:
        settings["host"] = host
    return settings


def files(
    program: Build, state: str, agent: bool, exporter: bool, uri: str, period: float, import_addresses: list, python: str, link: dict | None = None,
    missing_after: float = 300, events: dict | None = None,
) -> dict:
    """``{name: File}``: every file the runtime owns, with what it should hold for this state; ``link`` the link's
    settings (``_link.settings``), None without a link; ``events`` the events' settings (``events_settings``)."""
    present = state == "present"
    importer = present and agent and bool(import_addresses)
    linked = present and link is not None
    return {
        "link settings": File(_link.SETTINGS_FILE, (json.dumps(link, indent=2, sort_keys=True) + "\n").encode() if linked else None, 0o600),
        "events settings": File(
            _events.SETTINGS_FILE, (json.dumps(events or events_settings(), indent=2, sort_keys=True) + "\n").encode() if present else None,
        ),
        "link unit": File(UNIT_DIR + "/kvmhost-usb-link.service", link_unit(program, python).encode() if linked else None),
        "program": File(PROGRAM, program.content if present else None, 0o755),
        "command": File(COMMAND, None, link=PROGRAM if present else None),
        "agent unit": File(
            UNIT_DIR + "/kvmhost-usb-agent.service",
            agent_unit(program, uri, period, import_addresses, python, missing_after=missing_after, linked=linked).encode() if present and agent else None,
        ),
        "exporter unit": File(
            UNIT_DIR + "/kvmhost-usb-exporter.service",
            exporter_unit(program, python).encode() if present and exporter else None,
        ),
        "modules-load.d entry for vhci-hcd": File(MODULES_LOAD_DIR + "/kvmhost-usb-importer.conf", b"vhci-hcd\n" if importer else None),
        "modules-load.d entry for usbip-host": File(MODULES_LOAD_DIR + "/kvmhost-usb-exporter.conf", b"usbip-host\n" if present and exporter else None),
    }


def describe(content: bytes | str | None, program: bool) -> str:
    """What a diff shows of a file: the text of a unit, a line for the program."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content + "\n"
    if program:
        return "kvmhost-usb zipapp, %d bytes, sha256 %s\n" % (len(content), hashlib.sha256(content).hexdigest())
    return content.decode("utf-8", "replace")


def old_tree(root: str) -> bool:
    return os.path.isdir(root + OLD_TREE)


# Keep the import used: the program's entry is what ``closure`` starts from, and AnsiballZ packs a module's payload
# from its static imports, so this module must import it.
ENTRY_MODULE = _runtime
