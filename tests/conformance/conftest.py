"""Backends for the conformance suites: one fixture per part, parametrized over every backend.

Adding a backend means adding it to the list here, nothing else: no test names a backend.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from keel.messaging import Transport, connect
from tests.servers import server_url

# name -> function returning a URL for a fresh, isolated namespace on that backend
TRANSPORTS: dict[str, Callable[[], str]] = {
    "memory": lambda: f"memory://conformance-{uuid.uuid4().hex[:8]}",
    "nats": lambda: server_url("nats"),
    "rabbitmq": lambda: server_url("rabbitmq"),
    "redis": lambda: server_url("redis"),
}

# Brokers the fault tests restart: name -> (server name for scripts/servers, URL function).
# The memory transport lives inside the test process, so it has no broker to restart.
BROKERS: dict[str, tuple[str, Callable[[], str]]] = {
    "nats": ("nats", lambda: server_url("nats")),
    "rabbitmq": ("rabbitmq", lambda: server_url("rabbitmq")),
    "redis": ("redis", lambda: server_url("redis")),
}

_topic_ids = itertools.count()


@pytest.fixture(params=sorted(TRANSPORTS))
def transport_url(request: pytest.FixtureRequest) -> str:
    return TRANSPORTS[request.param]()


TransportFactory = Callable[[], Awaitable[Transport]]


@pytest.fixture
async def make_transport(transport_url: str) -> AsyncIterator[TransportFactory]:
    """Open extra connections to the same broker (as separate processes would)."""
    opened: list[Transport] = []

    async def make() -> Transport:
        transport = await connect(transport_url)
        opened.append(transport)
        return transport

    yield make
    for transport in reversed(opened):
        await transport.close()


@pytest.fixture
async def transport(make_transport: TransportFactory) -> Transport:
    return await make_transport()


@pytest.fixture
def topic() -> str:
    """A topic no other test uses (queues on real brokers outlive a test)."""
    return f"t{next(_topic_ids)}-{uuid.uuid4().hex[:6]}"
