from __future__ import annotations

import os

import pytest

from tests.lib import libvirtd
from tests.lib.domains import Domains


@pytest.fixture(scope="session", autouse=True)
def own_libvirtd():
    """A libvirtd of this run's own (tests.lib.domains.URI), never the machine's: parallel runs keep apart."""
    with libvirtd.running() as uri:
        yield uri


@pytest.fixture(scope="session", autouse=True)
def own_events_store(tmp_path_factory):
    """The events the modules, the agent and the exporter of this run record go to a store of the run's own, never to
    the machine's /var/lib/kvmhost-usb (a test that reads them gives each process a store of its own)."""
    os.environ["KVMHOST_USB_EVENTS"] = str(tmp_path_factory.mktemp("events"))
    yield


@pytest.fixture
def domains():
    """Diskless domains on the run's own libvirtd, removed at the end of the test (tests.lib.domains.Domains)."""
    created = Domains()
    yield created
    created.close()
