from __future__ import annotations

import pytest

from tests.lib import libvirtd
from tests.lib.domains import Domains


@pytest.fixture(scope="session", autouse=True)
def own_libvirtd():
    """A libvirtd of this run's own (tests.lib.domains.URI), never the machine's: parallel runs keep apart."""
    with libvirtd.running() as uri:
        yield uri


@pytest.fixture
def domains():
    """Diskless domains on the run's own libvirtd, removed at the end of the test (tests.lib.domains.Domains)."""
    created = Domains()
    yield created
    created.close()
