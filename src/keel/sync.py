"""The blocking facade: Keel's async APIs for threaded services.

Each operation is written once, async; a facade object runs it on a `Portal`, one event loop
in a background thread shared by every facade object in the process (so a blocking client
and a blocking server in one process reach each other on ``memory://``). A blocking call
raises exactly what the async one raises.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from keel import messaging
from keel._portal import Portal, portal
from keel.coordination.sync import SyncCoordinator, SyncHeldLock
from keel.coordination.sync import connect as connect_coordination
from keel.messaging import RequestContext, Target

T = TypeVar("T")


class Transport:
    """A blocking handle on an async transport; pass it to the other facade classes."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self.portal = portal()
        self.async_transport = self.portal.run(messaging.connect(url, **options))

    def close(self) -> None:
        self.portal.run(self.async_transport.close())

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def connect(url: str | None = None, **options: Any) -> Transport:
    return Transport(url, **options)


class RPCClient:
    """Blocking `keel.messaging.RPCClient`: same arguments, same errors."""

    def __init__(self, transport: Transport, target: Target, **options: Any) -> None:
        self._portal = transport.portal
        self._async: messaging.RPCClient = self._portal.run(
            _make(messaging.RPCClient, transport.async_transport, target, **options)
        )

    @classmethod
    def _wrap(cls, portal_: Portal, client: messaging.RPCClient) -> RPCClient:
        obj = object.__new__(cls)
        obj._portal = portal_
        obj._async = client
        return obj

    def prepare(self, **options: Any) -> RPCClient:
        return self._wrap(self._portal, self._async.prepare(**options))

    def call(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> Any:
        return self._portal.run(self._async.call(ctx, method, **kwargs))

    def cast(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> None:
        self._portal.run(self._async.cast(ctx, method, **kwargs))

    def fanout(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> None:
        self._portal.run(self._async.fanout(ctx, method, **kwargs))


class RPCServer:
    """Blocking `keel.messaging.RPCServer`; endpoints' sync methods run in its thread pool."""

    def __init__(
        self, transport: Transport, target: Target, endpoints: Sequence[object], **options: Any
    ) -> None:
        self._portal = transport.portal
        self._async: messaging.RPCServer = self._portal.run(
            _make(messaging.RPCServer, transport.async_transport, target, endpoints, **options)
        )

    @property
    def name(self) -> str:
        return self._async.name

    @property
    def state(self) -> messaging.ServerState:
        return self._async.state

    def start(self) -> None:
        self._portal.run(self._async.start())

    def stop(self, timeout: float | None = None) -> None:
        self._portal.run(self._async.stop(timeout))

    def __enter__(self) -> RPCServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class Notifier:
    """Blocking `keel.messaging.Notifier`."""

    def __init__(self, transport: Transport, publisher_id: str, **options: Any) -> None:
        self._portal = transport.portal
        self._async = messaging.Notifier(transport.async_transport, publisher_id, **options)

    def notify(
        self, ctx: RequestContext | None, event_type: str, payload: Any, priority: str
    ) -> None:
        self._portal.run(self._async.notify(ctx, event_type, payload, priority))

    def audit(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "audit")

    def debug(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "debug")

    def info(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "info")

    def warn(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "warn")

    warning = warn

    def error(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "error")

    def critical(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "critical")

    def sample(self, ctx: RequestContext | None, event_type: str, payload: Any) -> None:
        self.notify(ctx, event_type, payload, "sample")

    def flush(self) -> None:
        """With ``window=``: return once the broker holds every notification sent."""
        self._portal.run(self._async.flush())


class NotificationListener:
    """Blocking `keel.messaging.NotificationListener`."""

    def __init__(
        self,
        transport: Transport,
        targets: Iterable[Target],
        endpoints: Sequence[object],
        **options: Any,
    ) -> None:
        self._portal = transport.portal
        self._async = self._portal.run(
            _make(
                messaging.NotificationListener,
                transport.async_transport,
                list(targets),
                endpoints,
                **options,
            )
        )

    def start(self) -> None:
        self._portal.run(self._async.start())

    def stop(self, timeout: float = 25.0) -> None:
        self._portal.run(self._async.stop(timeout))

    def __enter__(self) -> NotificationListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


async def _make(factory: Any, *args: Any, **kwargs: Any) -> Any:
    # Objects that create asyncio primitives are built on the portal's loop.
    return factory(*args, **kwargs)


__all__ = [
    "NotificationListener",
    "Notifier",
    "Portal",
    "RPCClient",
    "RPCServer",
    "SyncCoordinator",
    "SyncHeldLock",
    "Transport",
    "connect",
    "connect_coordination",
    "portal",
]
