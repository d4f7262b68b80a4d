"""Backends for the conformance suites: one fixture per part, parametrized over every backend.

Adding a backend means adding it to the list here, nothing else: no test names a backend.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

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

# Options that make a transport whose broker redelivers unsettled messages on a timer (JetStream's
# ack_wait, Redis' visibility timeout) do so after REDELIVERY_WINDOW seconds, so a test can
# outlast that timer cheaply. Transports that redeliver only when a consumer goes need none.
REDELIVERY_WINDOW = 1.0
QUICK_REDELIVERY: dict[str, dict[str, float]] = {
    "nats": {"ack_wait": REDELIVERY_WINDOW},
    "redis": {"visibility_timeout": REDELIVERY_WINDOW},
}

_topic_ids = itertools.count()


@pytest.fixture(params=sorted(TRANSPORTS))
def transport_url(request: pytest.FixtureRequest) -> str:
    return TRANSPORTS[request.param]()


@pytest.fixture
def quick_redelivery(request: pytest.FixtureRequest, transport_url: str) -> dict[str, float]:
    """Keyword options for `make_transport`: see QUICK_REDELIVERY."""
    return QUICK_REDELIVERY.get(request.node.callspec.params["transport_url"], {})


TransportFactory = Callable[..., Awaitable[Transport]]


@pytest.fixture
async def make_transport(transport_url: str) -> AsyncIterator[TransportFactory]:
    """Open extra connections to the same broker (as separate processes would), with the
    transport's keyword options if given (``max_message_bytes=...``)."""
    opened: list[Transport] = []

    async def make(**options: Any) -> Transport:
        transport = await connect(transport_url, **options)
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
