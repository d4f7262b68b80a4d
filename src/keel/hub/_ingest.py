"""Ingest from a Keel transport: a NotificationListener whose handlers commit before they return.

The listener acknowledges a notification after its handler returns, and the handler returns
only after `Hub.ingest` committed the event to every matching queue; so the bus forgets a
notification only once the hub holds it. A handler that cannot commit raises, which the
listener turns into a dead letter on the bus with the reason (the bus keeps it, nothing is
silently lost). A crash between the commit and the ack makes the bus redeliver; the store
recognises the event id and does not enqueue it twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from keel.hub._core import Hub
from keel.hub._events import from_notification
from keel.messaging import NotificationListener, RequestContext, Target, Transport


class _Endpoint:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def _any(
        self,
        ctx: RequestContext | None,
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        await self.hub.ingest(from_notification(ctx, publisher_id, event_type, payload, metadata))

    audit = debug = info = warn = error = critical = sample = _any


def listener(
    hub: Hub,
    transport: Transport,
    *,
    topics: Sequence[str] = ("notifications",),
    pool: str = "keel-hub",
    max_concurrency: int = 256,
) -> NotificationListener:
    """A NotificationListener (not started) that ingests ``topics`` into ``hub``."""
    return NotificationListener(
        transport,
        [Target(t) for t in topics],
        [_Endpoint(hub)],
        pool=pool,
        max_concurrency=max_concurrency,
        service="keel-hub",
    )
