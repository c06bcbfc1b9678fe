# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The USB/IP exporter of a KVM host (the service ``kvmhost-usb-exporter``), in place of ``usbipd``.

It binds each present device of the exports table to ``usbip-host``, again after a replug, gives back the devices no
longer exported, and listens on the host's link address only. A peer is answered only with the exports declared for its
address; a connection from any other address is closed at once. An accepted import hands the socket to the kernel
(``usbip_sockfd``), as usbipd does, and only for a request the server (``server.py``) read whole and valid, of a bus id
exported to that peer. A peer that lost an import may watch for it (the collection's OP_REQ_WATCH, with the bus id the
device was at): the exporter tells it the moment the export is back, bound to usbip-host and free for an import again.

``main`` is its command line, run by the host runtime as ``kvmhost-usb exporter serve``, with ``list`` (what an
exporter offers this host) and ``imports`` (this host's imports) beside ``serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _events
from ansible_collections.kvmhost.usb.plugins.module_utils._errors import UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import importer, server, sysfs, table, wire
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.sysfs import SYS_USB
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip.wire import USBIP_PORT, port_of

# The devices the exporter bound to usbip-host, so that a restarted exporter gives back those no longer exported.
EXPORTED_PATH = "/run/kvmhost-usb/exported.json"


def log(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Exporter:
    """The exports of this host: bound to usbip-host while present, offered to their importer only."""

    def __init__(self, path=None, root=SYS_USB, out=log, state=EXPORTED_PATH):
        self.path = table.exports_path(path)
        self.root = root
        self.log = out
        self.state = state
        self.table = {"listen": None, "port": USBIP_PORT, "exports": []}
        self.mtime = None
        self.bound = self.load_state()  # busid -> export
        self.last_at = {}  # busid -> export: where each export's device was bound last, kept while it is away
        self.missing = set()
        self.selector = selectors.DefaultSelector()
        self.refusals = server.Refusals(out, said=self.refused)
        self.server = server.Server(self.selector, self.peers, self.answer, self.refusals)
        self.reload_wanted = True

    def refused(self, reason, peer, line, count):
        """A refusal the log says (the first of its kind in an interval, or the count of the others): an event."""
        _events.emit("refused", peer=peer, reason=reason, side="exporter", message=line, count=count, log=self.log)

    # The table

    def reload_if_changed(self):
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            mtime = None
        if mtime == self.mtime and not self.reload_wanted:
            return False
        self.reload_wanted = False
        self.mtime = mtime
        try:
            exports = table.read_exports(self.path)
        except UsbipError as error:
            self.log("%s; keeping the exports as they were" % error)
            return False
        if exports != self.table:
            self.log("loaded %d export(s) from %s" % (len(exports["exports"]), self.path))
        self.table = exports
        self.apply()
        return True

    def resolve(self):
        """``{busid: export}`` of the exports whose device is present."""
        present = {}
        devices = self.devices()
        for export in self.table["exports"]:
            busid = self.find(export, devices)
            key = export.get("id") or _declaration.describe_selector(export.get("selector") or {}) or "any device"
            if busid is None:
                if key not in self.missing:
                    self.log("export of %s to %s: not plugged in here; waiting for it" % (key, export.get("importer")))
                    self.missing.add(key)
                continue
            self.missing.discard(key)
            present[busid] = export
        return present

    def devices(self):
        # A device this host imported itself is never offered on.
        return sysfs.local_devices(self.root)

    @staticmethod
    def find(export, devices):
        selector = dict(export.get("selector") or {})
        if export.get("id"):
            selector = {"id": export["id"]}
        matches = [device for device in devices if wire.offered_matches(selector, device) and wire.serial_matches(selector, device)]
        if len(matches) == 1:
            return matches[0]["busid"]
        return None

    def apply(self):
        """Bind every present export to usbip-host; give back what is no longer exported."""
        wanted = self.resolve()
        for busid in sorted(set(self.bound) - set(wanted)):
            export = self.bound.pop(busid)
            try:
                if sysfs.unbind(busid, self.root):
                    self.log("gave %s (%s) back to its driver: no longer exported" % (busid, export.get("id")))
            except UsbipError as error:
                self.log("cannot give %s back: %s" % (busid, error))
        for busid, export in sorted(wanted.items()):
            try:
                if sysfs.bind(busid, self.root):
                    self.log(
                        "bound %s (%s) to usbip-host for %s (%s), domain %s"
                        % (busid, export.get("id"), export.get("importer"), export.get("importer_address"), export.get("domain"))
                    )
                self.bound[busid] = export
            except UsbipError as error:
                self.log("cannot export %s (%s): %s" % (busid, export.get("id"), error))
        self.remember()
        self.save_state()

    def remember(self):
        """Where each export of the table was bound last (``last_at``), one bus id an export: a watch names an export
        so while its device is away."""
        exports = self.table["exports"]
        bound = list(self.bound.values())
        last = dict((busid, export) for busid, export in self.last_at.items() if export in exports and export not in bound)
        last.update((busid, export) for busid, export in self.bound.items() if export in exports)
        self.last_at = last

    def load_state(self):
        try:
            with open(self.state) as handle:
                return dict((busid, {"id": busid}) for busid in json.load(handle))
        except (OSError, ValueError, TypeError):
            return {}

    def save_state(self):
        try:
            os.makedirs(os.path.dirname(self.state), exist_ok=True)
            with open(self.state + ".tmp", "w") as handle:
                json.dump(sorted(self.bound), handle)
            os.rename(self.state + ".tmp", self.state)
        except OSError as error:
            self.log("cannot record the bound devices in %s: %s" % (self.state, error))

    def for_peer(self, address):
        """``{busid: export}`` of the bound exports declared for this peer address."""
        return dict((busid, export) for busid, export in self.bound.items() if export.get("importer_address") == address)

    def peers(self):
        return set(export.get("importer_address") for export in self.table["exports"])

    # The server

    def listen(self):
        address, port = self.table.get("listen"), port_of(self.table.get("port"))
        if self.server.listen(address, port):
            self.log("listening on %s:%d" % (address, port))

    def answer(self, peer, code, busid, conn):
        """The reply to a whole, valid request of a declared peer (``server.Server``); None once an import is handed
        to the kernel."""
        if code == wire.OP_REQ_DEVLIST:
            offered = [sysfs.sysfs_device(name, self.root) for name in sorted(self.for_peer(peer))]
            return wire.pack_devlist_reply([device for device in offered if device is not None])
        if code == wire.OP_REQ_IMPORT:
            return self.export(conn, peer, busid)
        if code == wire.OP_REQ_WATCH:
            return self.watch(peer, busid)
        return wire.pack_op_common(wire.OP_REP_RELEASE, wire.ST_OK if self.give_back(peer, busid) else wire.ST_NODEV)

    def export(self, conn, peer, busid):
        """OP_REQ_IMPORT of ``busid`` by ``peer``: the socket handed to the kernel and the reply sent (None), or the
        refusal to send."""
        export = self.for_peer(peer).get(busid)
        device = sysfs.sysfs_device(busid, self.root) if export else None
        if export is None or device is None:
            self.refusals.refuse("import not exported", "refused the import of %s by %s: not exported to it" % (busid, peer), peer)
            return wire.pack_op_common(wire.OP_REP_IMPORT, wire.ST_NODEV)
        status = sysfs.stub_status(busid, self.root)
        if status != sysfs.SDEV_ST_AVAILABLE:
            why = "in use by an earlier import" if status == sysfs.SDEV_ST_USED else "usbip status %d" % status
            self.refusals.refuse("import unavailable", "refused the import of %s by %s: %s" % (busid, peer, why), peer)
            return wire.pack_op_common(wire.OP_REP_IMPORT, wire.ST_DEV_BUSY if status == sysfs.SDEV_ST_USED else wire.ST_NA)
        # The kernel takes the socket blocking, as usbipd hands it over.
        conn.setblocking(True)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sysfs.hand_over(busid, conn, self.root)
        except UsbipError as error:
            self.refusals.refuse("hand-over failed", "cannot export %s to %s: %s" % (busid, peer, error), peer)
            return wire.pack_op_common(wire.OP_REP_IMPORT, wire.ST_NA)
        self.log("exported %s (%s) to %s (%s), domain %s" % (busid, export.get("id"), export.get("importer"), peer, export.get("domain")))
        # 320 bytes, the first this socket sends: they fit its send buffer (4 KiB at the least), so this never waits.
        conn.sendall(wire.pack_op_common(wire.OP_REP_IMPORT) + wire.pack_usb_device(device))
        return None

    def watch(self, peer, busid):
        """OP_REQ_WATCH of ``busid`` by ``peer``, which lost its import: answered "back" at once when that export is free
        for an import, else held (``server.HOLD``) until it is (``answer_watches``). The bus id names the export by where
        its device was bound last; it may come back at another."""
        export = self.watched(peer, busid)
        if export is None:
            self.refusals.refuse("watch not exported", "refused the watch of %s by %s: not exported to it" % (busid, peer), peer)
            return wire.pack_op_common(wire.OP_REP_WATCH, wire.ST_NODEV)
        if self.available(export) is not None:
            return wire.pack_op_common(wire.OP_REP_WATCH)
        return server.HOLD

    def watched(self, peer, busid):
        """The export declared for ``peer`` whose device is, or was last, at ``busid``; None when there is none."""
        export = self.last_at.get(busid)
        if export is None or export.get("importer_address") != peer:
            return None
        return export

    def available(self, export):
        """The bus id at which an export's device is bound to usbip-host and free for an import; None while it is not."""
        for busid, item in sorted(self.bound.items()):
            if item == export and sysfs.stub_status(busid, self.root) == sysfs.SDEV_ST_AVAILABLE:
                return busid
        return None

    def answer_watches(self):
        """Answer the held watches whose export is back (bound again after a replug, or free again after a broken
        connection), and "no such device" to those whose export was removed meanwhile."""
        for connection in self.server.held():
            export = self.watched(connection.peer, connection.busid)
            if export is None:
                self.server.answer_held(connection, wire.pack_op_common(wire.OP_REP_WATCH, wire.ST_NODEV))
                continue
            busid = self.available(export)
            if busid is None:
                continue
            self.log("%s (%s) is back: told %s (%s), domain %s" % (busid, export.get("id"), export.get("importer"), connection.peer, export.get("domain")))
            self.server.answer_held(connection, wire.pack_op_common(wire.OP_REP_WATCH))

    def give_back(self, peer, busid):
        """The importer at ``peer`` took the device back: drop its export from the table, give the device back to
        its driver. False when nothing of the kind is exported to that peer."""
        export = self.for_peer(peer).get(busid)
        if export is None:
            self.refusals.refuse("release not exported", "%s gave back %s, which is not exported to it" % (peer, busid), peer)
            return False
        kept = dict(self.table, exports=[item for item in self.table["exports"] if not self._same_export(item, export)])
        try:
            table.write_exports(kept, self.path)
        except OSError as error:
            self.log("cannot drop the export of %s from %s: %s" % (busid, self.path, error))
            return False
        self.log("%s (%s) given back by %s (%s), domain %s: export removed" % (busid, export.get("id"), export.get("importer"), peer, export.get("domain")))
        self.reload_wanted = True
        self.reload_if_changed()
        return True

    @staticmethod
    def _same_export(item, export):
        fields = ("id", "selector", "importer", "importer_address", "domain")
        return all(item.get(field) == export.get(field) for field in fields)

    # udev and the loop

    def on_udev(self, monitor):
        changed = False
        while True:
            event = monitor.poll(timeout=0)
            if event is None:
                break
            if event.action in ("add", "remove", "bind", "unbind"):
                changed = True
        if changed:
            self.apply()

    def run(self):
        signal.signal(signal.SIGHUP, self.on_hup)
        monitor = None
        try:
            import pyudev

            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.filter_by(subsystem="usb", device_type="usb_device")
            monitor.start()
            self.selector.register(monitor, selectors.EVENT_READ, lambda: self.on_udev(monitor))
        except ImportError:
            self.log("pyudev is missing: replugs are caught by the periodic check only")
        self.log("exporting USB devices over USB/IP, table %s" % self.path)
        last_check = 0.0
        down = None
        notified = False
        while True:
            now = time.monotonic()
            if now - last_check >= 1.0:
                last_check = now
                reloaded = self.reload_if_changed()
                try:
                    self.listen()
                    if down is not None:
                        self.log("listening again after %.1f s" % (now - down))
                    down = None
                except UsbipError as error:
                    if down is None:
                        self.log("%s; retrying every 2 s" % error)
                        down = now
                if not notified:
                    # systemd (Type=notify) ends `systemctl restart` here: importers may connect from now on.
                    notify_ready()
                    notified = True
                if not reloaded and monitor is None:
                    self.apply()
            self.poll(1.0)

    def poll(self, longest):
        """One turn of the loop: wait for events (``longest`` seconds at most, less when a connection's deadline comes
        sooner) and handle them, answer the watches whose export is back, close the connections past their deadline,
        log the refusals not logged yet."""
        for key, _mask in self.selector.select(timeout=self.server.timeout(longest)):
            key.data()
        self.answer_watches()
        self.server.expire()
        self.refusals.flush()

    def on_hup(self, _signum, _frame):
        self.reload_wanted = True


def notify_ready():
    """Tell systemd the exporter is serving (sd_notify READY=1), when it runs under a Type=notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.connect(address)
            notify.sendall(b"READY=1")
    except OSError as error:
        log("cannot tell systemd the exporter is ready (%s): %s" % (address, error))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvmhost-usb-exporter", description=__doc__.split("\n\n", maxsplit=1)[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="export the devices of the exports table over USB/IP")
    serve.add_argument("--exports", default=None, help="exports table (default: %s)" % table.EXPORTS_PATH)
    remote = commands.add_parser("list", help="list the devices an exporter offers this host")
    remote.add_argument("address")
    remote.add_argument("--port", type=int, default=USBIP_PORT)
    commands.add_parser("imports", help="list this host's imports")
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            Exporter(args.exports).run()
        elif args.command == "list":
            for device in wire.remote_devices(args.address, args.port):
                sys.stdout.write(
                    "%s %s:%s speed %d devid 0x%08x" % (device["busid"], device["vendor_id"], device["product_id"], device["speed"], device["devid"]) + "\n"
                )
        else:
            for record in importer.imports():
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    except UsbipError as error:
        sys.stderr.write("%s\n" % error)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
