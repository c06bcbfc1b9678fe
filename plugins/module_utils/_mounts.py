# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""Which USB devices back a mounted filesystem of the host, from udev and /proc/self/mountinfo.

A block device backs a mount when its ``major:minor`` or its device node is a mount's source.
The block devices of a USB device are those below its sysfs path (disks and their partitions),
and what is stacked on them (device mapper, md RAID), found through sysfs ``holders``.
"""

from __future__ import annotations

import os

from typing import Any

from ansible_collections.kvmhost.usb.plugins.module_utils._usb import pyudev

MOUNTINFO = "/proc/self/mountinfo"


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mount_table(path: str = MOUNTINFO) -> list[tuple[str, str, str]]:
    """``(major:minor, source, mount point)`` of every mount."""
    table = []
    with open(path, "r") as handle:
        for line in handle:
            fields = line.split()
            if " - " not in line or len(fields) < 5:
                continue
            tail = line.split(" - ", 1)[1].split()
            source = _unescape(tail[1]) if len(tail) > 1 else ""
            table.append((fields[2], source, _unescape(fields[4])))
    return table


def _devno(block: Any) -> str | None:
    major = block.properties.get("MAJOR")
    minor = block.properties.get("MINOR")
    if major is not None and minor is not None:
        return "%s:%s" % (major, minor)
    dev = block.attributes.get("dev")
    return dev.decode("ascii", "replace").strip() if dev else None


def _with_holders(context: Any, blocks: list) -> list:
    found = dict((block.sys_path, block) for block in blocks)
    pending = list(blocks)
    while pending:
        block = pending.pop()
        try:
            holders = os.listdir(os.path.join(block.sys_path, "holders"))
        except OSError:
            continue
        for name in holders:
            try:
                holder = pyudev.Devices.from_name(context, "block", name)
            except pyudev.DeviceNotFoundError:
                continue
            if holder.sys_path not in found:
                found[holder.sys_path] = holder
                pending.append(holder)
    return list(found.values())


def backing_mounts(context: Any, sys_path: str, table: list[tuple[str, str, str]]) -> list[str]:
    """The mounts (``"mount point (device node)"``) that the USB device at ``sys_path`` backs."""
    prefix = sys_path.rstrip("/") + "/"
    blocks = [block for block in context.list_devices(subsystem="block") if block.sys_path.startswith(prefix)]
    if not blocks:
        return []
    mounts = []
    for block in _with_holders(context, blocks):
        devno = _devno(block)
        node = block.device_node
        for mount_devno, source, mount_point in table:
            if mount_devno == devno or (node and source == node):
                described = "%s (%s)" % (mount_point, node or block.sys_name)
                if described not in mounts:
                    mounts.append(described)
    return mounts
