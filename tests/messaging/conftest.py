"""Fixtures shared by this folder's transport tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keel.messaging import connect
from keel.messaging.transports.base import Transport
from tests.servers import server_url


@pytest.fixture
async def nats_transport() -> AsyncIterator[Transport]:
    """A transport on the real NATS server of scripts/servers."""
    t = await connect(server_url("nats"))
    try:
        yield t
    finally:
        await t.close()
