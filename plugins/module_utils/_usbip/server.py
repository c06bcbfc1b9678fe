# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The exporter's TCP side: its listening socket and the connections of its peers, whose bytes are untrusted.

One thread, one selector. A connection is taken only from a declared peer address and only while fewer than
``max_connections`` are open, ``max_per_peer`` of them from its address; any other is closed at once, before a byte is
read. Each connection has one deadline for its whole exchange (request read, reply written), not one per read, and
reads into a buffer no longer than its request: the 8-byte header, then the rest of the length its code gives. A
request is answered only when it is whole and valid (``wire.request_code``, ``wire.request_busid``) and no byte follows
it; anything else closes the connection unanswered. An error in one connection closes that connection only. Every
refusal goes to ``Refusals``: one log line per kind of refusal per interval, the others counted.

A watch (the collection's OP_REQ_WATCH) the exporter cannot answer yet is held: its connection stays open past the
request's deadline, until the exporter answers it (``answer_held``) or for ``hold_time`` seconds, after which it is
answered "not yet". Held watches are at most half the connections, of all and of one address's, so that imports always
find room; a held watch's peer sends nothing more, and its end of the connection closes it.
"""

from __future__ import annotations

import selectors
import socket
import time

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import RequestError, UsbipError
from ansible_collections.kvmhost.usb.plugins.module_utils._usbip import wire

# The whole exchange of a connection, in seconds: a request is 8 or 40 bytes, and a reply fits a socket's buffer.
REQUEST_DEADLINE = 5.0
# Connections open at once, and from one address: an importer makes one at a time per device.
MAX_CONNECTIONS = 64
MAX_PER_PEER = 8
# How long a watch is held at most before it is answered "not yet" (the importer then opens another), and how many are
# held at once, of all and from one address: half the connections, so that imports always find room.
WATCH_HOLD = 120.0
MAX_WATCHES = MAX_CONNECTIONS // 2
MAX_WATCHES_PER_PEER = MAX_PER_PEER // 2
# One log line per kind of refusal in this many seconds; the others are counted in one line at its end.
REFUSAL_INTERVAL = 60.0
LISTEN_BACKLOG = 128
# Connections accepted in one turn of the loop, so that the open ones are served between two batches.
ACCEPT_BATCH = 64
# What ``answer`` returns for a watch it cannot answer yet: the connection is held.
HOLD = "hold"


class Refusals:
    """The exporter's refusals, logged one line per kind (``reason``) per interval: the first of a kind at once, the
    others of its interval counted and said in one line when the interval is over (``flush``). The kinds are fixed
    strings of the code, never a peer's bytes or address, so what this holds is bounded. ``said(reason, peer, line,
    count)``, when given, is told each line logged (the exporter records it as an event): ``count`` refusals, the
    last of them from ``peer``."""

    def __init__(self, out, interval=REFUSAL_INTERVAL, clock=time.monotonic, said=None):
        self.out = out
        self.interval = interval
        self.clock = clock
        self.said = said
        self.kinds = {}  # reason -> [start of its interval, refusals not logged, the last of them, its peer]

    def refuse(self, reason, line, peer=None):
        kind = self.kinds.get(reason)
        if kind is None:
            self.kinds[reason] = [self.clock(), 0, None, None]
            self.out(line)
            if self.said is not None:
                self.said(reason, peer, line, 1)
        else:
            kind[1] += 1
            kind[2] = line
            kind[3] = peer

    def flush(self):
        """Log how many refusals of each kind went unlogged in an interval now over; a kind with none is forgotten,
        so that its next refusal is logged at once."""
        now = self.clock()
        for reason, (start, unlogged, last, peer) in list(self.kinds.items()):
            if now - start < self.interval:
                continue
            if unlogged:
                line = "%d more refusal(s) of the kind '%s' in %d s, the last: %s" % (unlogged, reason, now - start, last)
                self.out(line)
                if self.said is not None:
                    self.said(reason, peer, line, unlogged)
                self.kinds[reason] = [now, 0, None, None]
            else:
                del self.kinds[reason]


class Connection:
    """One peer's connection: its request read into a buffer no longer than the request, then its reply written,
    both before one deadline."""

    def __init__(self, sock, peer, deadline):
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.request = bytearray()
        self.code = None  # known once the header is read and valid
        self.size = wire.OP_COMMON.size  # the length of the request: the header's, then that of the header's code
        self.busid = None  # the bus id of a whole, valid request that names one
        self.held = False  # a watch waiting for its answer
        self.reply = None  # the bytes of the reply not written yet, once there is one


class Server:
    """The listening socket and its connections, in the exporter's selector. ``peers()`` is the set of addresses a
    connection is taken from; ``answer(peer, code, busid, sock)`` answers a whole, valid request: the reply's bytes,
    None when the exchange is over (an import handed to the kernel), or HOLD for a watch to answer later
    (``held``, ``answer_held``)."""

    def __init__(self, selector, peers, answer, refusals):
        self.selector = selector
        self.peers = peers
        self.answer = answer
        self.refusals = refusals
        self.deadline = REQUEST_DEADLINE
        self.max_connections = MAX_CONNECTIONS
        self.max_per_peer = MAX_PER_PEER
        self.hold_time = WATCH_HOLD
        self.max_watches = MAX_WATCHES
        self.max_watches_per_peer = MAX_WATCHES_PER_PEER
        self.listener = None
        self.listening = None  # (address, port)
        self.connections = {}  # socket -> Connection
        self.per_peer = {}  # address -> connections open from it

    # The listening socket

    def listen(self, address, port):
        """Listen on ``address``:``port`` (no longer, when ``address`` is None); True when it began to now."""
        if self.listening == (address, port) or (self.listening is None and not address):
            return False
        self.stop()
        if not address:
            return False
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((address, port))
            listener.listen(LISTEN_BACKLOG)
        except OSError as error:
            listener.close()
            raise UsbipError("cannot listen on %s:%d: %s" % (address, port, error.strerror or error))
        listener.setblocking(False)
        self.listener = listener
        self.listening = (address, port)
        self.selector.register(listener, selectors.EVENT_READ, self.accept)
        return True

    def stop(self):
        """Stop listening; the open connections end by their deadline."""
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
        self.listener = None
        self.listening = None

    def close(self):
        """Stop listening and close every connection."""
        self.stop()
        for connection in list(self.connections.values()):
            self.drop(connection)

    def accept(self):
        for _index in range(ACCEPT_BATCH):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # A connection reset before it was taken, or out of descriptors (the caps keep this far from the
                # limit): the next turn of the loop tries again.
                self.refusals.refuse("cannot accept", "cannot accept a connection: %s" % (error.strerror or error))
                return
            self.admit(sock, address[0])

    def admit(self, sock, peer):
        refusal = None
        if peer not in self.peers():
            refusal = ("undeclared address", "no export is declared for it")
        elif len(self.connections) >= self.max_connections:
            refusal = ("too many connections", "%d connections are open, the most the exporter takes" % len(self.connections))
        elif self.per_peer.get(peer, 0) >= self.max_per_peer:
            refusal = ("too many connections from one address", "%d connections from it are open, the most one address may have" % self.max_per_peer)
        if refusal is not None:
            self.refusals.refuse(refusal[0], "refused connection from %s: %s" % (peer, refusal[1]), peer)
            sock.close()
            return
        sock.setblocking(False)
        connection = Connection(sock, peer, time.monotonic() + self.deadline)
        self.connections[sock] = connection
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        self.selector.register(sock, selectors.EVENT_READ, lambda: self.turn(connection))

    # A connection

    def turn(self, connection, work=None):
        """Read or write what the connection is ready for (or do ``work``, a held watch's answer); a refusal or an error
        closes it, and it alone."""
        try:
            if work is not None:
                work()
            elif connection.held:
                self.read_held(connection)
            elif connection.reply is None:
                self.read(connection)
            else:
                self.write(connection)
        except RequestError as error:
            self.refusals.refuse(error.reason, "refused a request from %s: %s" % (connection.peer, error), connection.peer)
            self.drop(connection)
        except OSError as error:
            self.refusals.refuse("connection failed", "connection from %s failed: %s" % (connection.peer, error.strerror or error), connection.peer)
            self.drop(connection)
        except Exception as error:  # pylint: disable=broad-except  # a bug met by one peer's bytes must not end the others' service
            self.refusals.refuse(
                "exporter error", "closed the connection from %s on an error of the exporter: %r" % (connection.peer, error), connection.peer
            )
            self.drop(connection)

    def read(self, connection):
        try:
            data = connection.sock.recv(connection.size - len(connection.request))
        except (BlockingIOError, InterruptedError):
            return
        if not data:
            raise RequestError(
                "truncated request", "the connection closed after %d byte(s), before the request's %d" % (len(connection.request), connection.size)
            )
        connection.request += data
        if connection.code is None and len(connection.request) == wire.OP_COMMON.size:
            connection.code = wire.request_code(bytes(connection.request))
            connection.size = wire.REQUEST_SIZES[connection.code]
        if connection.code is not None and len(connection.request) == connection.size:
            self.complete(connection)

    def complete(self, connection):
        """A request of the right length has been read: answer it if nothing follows it and its bus id is valid."""
        try:
            following = connection.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            following = b""
        if following:
            raise RequestError("request too long", "more bytes follow the %d of a request of code 0x%04x" % (connection.size, connection.code))
        header = wire.OP_COMMON.size
        if connection.size > header:
            connection.busid = wire.request_busid(bytes(connection.request[header:]))
        reply = self.answer(connection.peer, connection.code, connection.busid, connection.sock)
        if reply is HOLD:
            self.hold(connection)
        elif reply:
            self.send(connection, reply)
        else:
            self.drop(connection)

    def send(self, connection, reply):
        """Write a connection's reply, then close it; a held watch's reply has a deadline of its own."""
        if connection.held:
            connection.held = False
            connection.deadline = time.monotonic() + self.deadline
        connection.reply = reply
        self.selector.modify(connection.sock, selectors.EVENT_WRITE, lambda: self.turn(connection))
        self.write(connection)

    def write(self, connection):
        try:
            sent = connection.sock.send(connection.reply)
        except (BlockingIOError, InterruptedError):
            return
        connection.reply = connection.reply[sent:]
        if not connection.reply:
            self.drop(connection)

    # Held watches

    def hold(self, connection):
        """Hold a watch until ``answer_held`` answers it, ``hold_time`` seconds at most; one over the caps is answered
        "error" at once."""
        held = self.held()
        refusal = None
        if len(held) >= self.max_watches:
            refusal = "%d watches are held, the most the exporter holds" % len(held)
        elif len([item for item in held if item.peer == connection.peer]) >= self.max_watches_per_peer:
            refusal = "%d watches from it are held, the most one address may have" % self.max_watches_per_peer
        if refusal is not None:
            self.refusals.refuse("too many watches", "refused the watch of %s by %s: %s" % (connection.busid, connection.peer, refusal), connection.peer)
            self.send(connection, wire.pack_op_common(wire.OP_REP_WATCH, wire.ST_ERROR))
            return
        connection.held = True
        connection.deadline = time.monotonic() + self.hold_time

    def held(self):
        """The held watches: Connections, each with its ``peer`` and ``busid``."""
        return [connection for connection in self.connections.values() if connection.held]

    def answer_held(self, connection, reply):
        """Answer a held watch, and close it once the reply is written."""
        self.turn(connection, lambda: self.send(connection, reply))

    def read_held(self, connection):
        """A held watch's peer has nothing more to send: its end of the connection closes it (it no longer waits, which
        is no refusal), a byte is refused."""
        try:
            data = connection.sock.recv(1)
        except (BlockingIOError, InterruptedError):
            return
        if data:
            raise RequestError("request too long", "more bytes follow the %d of a request of code 0x%04x" % (connection.size, connection.code))
        self.drop(connection)

    def drop(self, connection):
        if self.connections.pop(connection.sock, None) is None:
            return
        self.selector.unregister(connection.sock)
        connection.sock.close()
        left = self.per_peer.pop(connection.peer) - 1
        if left:
            self.per_peer[connection.peer] = left

    # Deadlines

    def expire(self):
        """Close the connections whose deadline has passed; answer the watches held so long "not yet"."""
        now = time.monotonic()
        for connection in [item for item in self.connections.values() if item.deadline <= now]:
            if connection.held:
                self.answer_held(connection, wire.pack_op_common(wire.OP_REP_WATCH, wire.ST_NA))
                continue
            if connection.reply is None:
                what = "%d of %d byte(s) of a request" % (len(connection.request), connection.size)
            else:
                what = "a reply with %d byte(s) not taken" % len(connection.reply)
            self.refusals.refuse("deadline", "closed the connection from %s after %g s with %s" % (connection.peer, self.deadline, what), connection.peer)
            self.drop(connection)

    def timeout(self, longest):
        """How long the loop may wait for events: ``longest``, or less when a deadline comes sooner."""
        if not self.connections:
            return longest
        return max(0.0, min(longest, min(item.deadline for item in self.connections.values()) - time.monotonic()))
