"""Which files of a directory something writes, as the kernel's inotify sees them (through ctypes: the standard
library has no inotify). A file replaced whole (written beside it, then renamed over it, as libvirtd saves a
domain's definition) counts as one write, as does a file written in place and closed."""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import os
import select
import struct

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, len bytes padded with NULs


class Writes:
    """``with Writes(directory) as writes: ...`` then ``writes.count(name)``: how often the file was written."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.counts: collections.Counter = collections.Counter()
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = -1

    def __enter__(self) -> Writes:
        self._fd = self._libc.inotify_init1(IN_NONBLOCK)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self._fd, self.directory.encode(), IN_CLOSE_WRITE | IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch %s" % self.directory)
        return self

    def __exit__(self, *exc: object) -> None:
        self._read(timeout=0.5)
        os.close(self._fd)

    def _read(self, timeout: float) -> None:
        while select.select([self._fd], [], [], timeout)[0]:
            data = os.read(self._fd, 65536)
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0").decode()
                self.counts[name] += 1
                offset += EVENT.size + length

    def count(self, name: str) -> int:
        return self.counts[name]
