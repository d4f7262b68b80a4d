"""The real oslo.messaging stack for interop tests, imported once and quietly."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.servers import server_url

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice on import
    import oslo_messaging
    from oslo_config import cfg
    from oslo_context import context as oslo_context

__all__ = [
    "EXCHANGE",
    "notification_transport",
    "oslo_context",
    "oslo_messaging",
    "oslo_transport",
    "rabbit",
]

EXCHANGE = "openstack"  # oslo.messaging's default control_exchange


@contextmanager
def notification_transport(url: str) -> Iterator[Any]:
    """oslo's notification transport on ``url``, as a service configures it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg.CONF([], project="keel-tests")
        transport = oslo_messaging.get_notification_transport(cfg.CONF, url=url)
    try:
        yield transport
    finally:
        transport.cleanup()


# Fixtures for the modules that import them: the RabbitMQ of scripts/servers, and oslo's
# notification transport on it.
@pytest.fixture(scope="module")
def rabbit() -> str:
    return server_url("rabbitmq")


@pytest.fixture(scope="module")
def oslo_transport(rabbit: str) -> Iterator[Any]:
    with notification_transport(rabbit) as transport:
        yield transport
