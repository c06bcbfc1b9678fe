# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""USB/IP across KVM hosts: a device plugged into host A used by a domain on host B.

The kernel does the data path (``usbip-host`` on A, ``vhci-hcd`` on B); this package speaks the standard USB/IP wire
protocol around it, in place of ``usbipd`` and ``usbip attach``, one concept a file:

* ``wire``: the protocol's messages, and the requests an importer makes of an exporter;
* ``sysfs``: the kernel's side, ``usbip-host`` (bind, unbind, the socket handed over) and ``vhci-hcd`` (its ports);
* ``table``: the exports table of the exporting host, written by usb_export;
* ``importer``: imports made, recorded, found and released on the importing host;
* ``exporter``: the exporter service of the exporting host, and its command line (``python3 -m`` this package).

Neither end needs the ``usbip`` tools; ``usbip list -r A`` from B still works, for the exports of B.
"""
