"""The project's own USB test host: a Debian 12 VM under QEMU (TCG) with emulated USB devices.

See docs/testhost.md. The main entry point is ``TestHost``; ``python -m tests.testhost``
is a command line for developers (up, down, status, ssh, plug, unplug, replug).
"""

from .host import TestHost, TestHostError
from .topology import Device, Topology, load as load_topology

__all__ = ["TestHost", "TestHostError", "Device", "Topology", "load_topology"]
