"""Ingest from a Keel transport: a NotificationListener whose handlers commit before they return.

The listener acknowledges a notification after its handler returns, and the handler returns
only after `Hub.ingest` committed the event to every matching queue; so the bus forgets a
notification only once the hub holds it. A commit that fails is retried while the
notification stays unacknowledged on the bus (a store restart or a locked database does not
turn every notification of the outage into a dead letter); after ``commit_patience`` seconds
the handler raises, which the listener turns into a dead letter on the bus with the reason
(the bus keeps it, nothing is silently lost). A crash before the commit leaves the
notification unacknowledged, so the bus redelivers it; a crash between the commit and the ack
makes the bus redeliver too, and the store recognises the event id and does not enqueue it
twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from keel._log import event as log_event
from keel.errors import BadRequest
from keel.hub._core import Hub
from keel.hub._events import CloudEvent, from_notification
from keel.messaging import NotificationListener, RequestContext, Target, Transport

log = logging.getLogger("keel.hub.ingest")

COMMIT_PATIENCE = 120.0  # well under RabbitMQ's 30 min consumer_timeout for unacked deliveries
_FIRST_RETRY = 0.2
_MAX_RETRY = 10.0


async def commit(hub: Hub, event: CloudEvent, *, patience: float = COMMIT_PATIENCE) -> None:
    """`Hub.ingest`, retried with backoff for up to ``patience`` seconds, then its error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = _FIRST_RETRY
    attempt = 1
    while True:
        try:
            await hub.ingest(event)
        except BadRequest:
            raise  # the event itself is refused (too deep): no retry makes it acceptable
        except Exception as exc:
            if loop.time() + delay > deadline:
                raise
            log_event(
                log,
                logging.WARNING,
                "hub.commit_retry",
                event_id=event.id,
                attempt=attempt,
                retry_in=f"{delay:.1f}",
                error=repr(exc),
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, _MAX_RETRY)
            attempt += 1
        else:
            return


class Endpoint:
    """One method per priority: map the notification, commit it, then let the listener ack."""

    def __init__(self, hub: Hub, *, patience: float) -> None:
        self.hub = hub
        self.patience = patience

    async def _any(
        self,
        ctx: RequestContext | None,
        publisher_id: str,
        event_type: str,
        payload: Any,
        metadata: dict[str, Any],
    ) -> None:
        event = from_notification(ctx, publisher_id, event_type, payload, metadata)
        await commit(self.hub, event, patience=self.patience)

    audit = debug = info = warn = error = critical = sample = _any


def listener(
    hub: Hub,
    transport: Transport,
    *,
    topics: Sequence[str] = ("notifications",),
    pool: str = "keel-hub",
    max_concurrency: int = 256,
    commit_patience: float = COMMIT_PATIENCE,
) -> NotificationListener:
    """A NotificationListener (not started) that ingests ``topics`` into ``hub``."""
    return NotificationListener(
        transport,
        [Target(t) for t in topics],
        [Endpoint(hub, patience=commit_patience)],
        pool=pool,
        max_concurrency=max_concurrency,
        service="keel-hub",
    )
