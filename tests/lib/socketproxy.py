"""A unix-socket relay in front of the test run's libvirtd: a client that connects through it sees libvirtd go
away (``stop`` closes every relayed connection and the listening socket) and come back (``start``), while
libvirtd itself, with the run's domains, keeps running."""

from __future__ import annotations

import os
import selectors
import socket
import threading

from tests.lib.domains import LIBVIRT_DIR

LIBVIRT_SOCKET = os.path.join(LIBVIRT_DIR, "run", "libvirt-sock")


class SocketProxy:
    def __init__(self, path: str, upstream: str = LIBVIRT_SOCKET) -> None:
        self.path = path
        self.upstream = upstream
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.wake: tuple[socket.socket, socket.socket] | None = None
        self.connections: list[socket.socket] = []

    @property
    def uri(self) -> str:
        return "qemu+unix:///system?socket=%s" % self.path

    def start(self) -> SocketProxy:
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.wake = socket.socketpair()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Close everything, as a stopped libvirtd would: clients read end of file, new ones are refused."""
        if self.thread is None:
            return
        self.wake[1].send(b"x")
        self.thread.join(10)
        self.thread = None
        for sock in [self.listener, *self.wake, *self.connections]:
            sock.close()
        self.connections = []
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _relay(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        selector.register(self.wake[0], selectors.EVENT_READ, None)
        while True:
            for key, _events in selector.select():
                if key.fileobj is self.wake[0]:
                    selector.close()
                    return
                if key.fileobj is self.listener:
                    client, _address = self.listener.accept()
                    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    server.connect(self.upstream)
                    self.connections += [client, server]
                    selector.register(client, selectors.EVENT_READ, server)
                    selector.register(server, selectors.EVENT_READ, client)
                    continue
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if data:
                    key.data.sendall(data)
                else:
                    for sock in (key.fileobj, key.data):
                        selector.unregister(sock)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
