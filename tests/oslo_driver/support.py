"""Helpers for driving unchanged oslo.messaging API code over Keel's driver.

Every test runs on every Keel transport, in this process (oslo's threading executor; the
eventlet world is oslo's own suite, tests/oslo_driver/test_oslo_suite.py).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tests.oslo import oslo_messaging
from tests.servers import server_url

KEEL_URLS: dict[str, Callable[[], str]] = {
    "memory": lambda: f"keel+memory://oslo-{uuid.uuid4().hex[:8]}",
    "nats": lambda: "keel+" + server_url("nats"),
    "rabbitmq": lambda: "keel+" + server_url("rabbitmq"),
    "redis": lambda: "keel+" + server_url("redis"),
}
BROKER_URLS = {name: url for name, url in KEEL_URLS.items() if name != "memory"}


class Oslo:
    """Transports, servers and listeners opened by one test, closed after it."""

    def __init__(self, conf: Any, url: str) -> None:
        self.conf = conf
        self.url = url
        self._transports: list[Any] = []
        self._servers: list[Any] = []

    def rpc_transport(self, url: str | None = None, **options: Any) -> Any:
        transport = oslo_messaging.get_rpc_transport(self.conf, url=url or self.url, **options)
        self._transports.append(transport)
        return transport

    def notification_transport(self, url: str | None = None) -> Any:
        transport = oslo_messaging.get_notification_transport(self.conf, url=url or self.url)
        self._transports.append(transport)
        return transport

    def server(self, target: Any, endpoints: list[Any], transport: Any = None) -> Any:
        server = oslo_messaging.get_rpc_server(
            transport or self.rpc_transport(), target, endpoints, executor="threading"
        )
        server.start()
        self._servers.append(server)
        return server

    def listener(
        self, targets: list[Any], endpoints: list[Any], transport: Any = None, **options: Any
    ) -> Any:
        listener = oslo_messaging.get_notification_listener(
            transport or self.notification_transport(),
            targets,
            endpoints,
            executor="threading",
            **options,
        )
        listener.start()
        self._servers.append(listener)
        return listener

    def client(self, target: Any, transport: Any = None, **options: Any) -> Any:
        return oslo_messaging.get_rpc_client(transport or self.rpc_transport(), target, **options)

    def close(self) -> None:
        for server in reversed(self._servers):
            server.stop()
            server.wait()
        for transport in reversed(self._transports):
            transport.cleanup()


class Recorder:
    """Thread-safe list with a way to wait for it to fill."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = threading.Condition()

    def add(self, item: Any) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Any]:
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.items) >= count, timeout):
                pytest.fail(f"{len(self.items)} of {count} arrived within {timeout}s")
            return list(self.items)
