"""Fixtures shared by the download tests: a loopback HTTP server and the bytes of a small served checkpoint."""

import pytest

from tests.loopback import LoopbackServer


@pytest.fixture(scope="module")
def good_bytes() -> bytes:
    from tests.test_download import checkpoint_bytes  # here: it imports torch, which the xdist controller never needs

    return checkpoint_bytes()


@pytest.fixture
def server():
    with LoopbackServer() as running:
        yield running
