from __future__ import annotations

import pytest

from tests.lib import libvirtd

# The domains fixture the usb_attach, usb_detach and passthrough role tests share.
pytest_plugins = ["tests.unit.passthrough_support"]


@pytest.fixture(scope="session", autouse=True)
def own_libvirtd():
    """A libvirtd of this run's own (tests.lib.domains.URI), never the machine's: parallel runs keep apart."""
    with libvirtd.running() as uri:
        yield uri
