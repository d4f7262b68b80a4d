"""Ingest OpenStack notifications (oslo.messaging on RabbitMQ), legacy and versioned.

`oslo_listener` is a `keel.messaging.oslo.OsloNotificationListener` (oslo's queue names and
wire format) with the hub's ingest endpoint: the notification becomes a CloudEvent
(`keel.hub._events.from_notification`, the same mapping as on a Keel transport) and is
acknowledged to RabbitMQ only after `keel.hub._ingest.commit` put it in every matching queue.
A body that is not an oslo notification is dead-lettered to ``<queue>.dlq`` with the reason
by the listener; a commit that keeps failing past the patience is dead-lettered the same way.

The services' defaults decide the declarations: oslo declares exchange and queues durable only
with ``amqp_durable_queues = True``; pass the same ``durable`` (and ``exchange_durable`` in
the transport URL), or RabbitMQ refuses the second declaration. One transport listens to one
exchange (``nova``, ``openstack``, ...): `oslo_url` builds the URL for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from keel.errors import ConfigError
from keel.hub._core import Hub
from keel.hub._ingest import COMMIT_PATIENCE, Endpoint
from keel.messaging import Target, Transport
from keel.messaging.oslo import OsloNotificationListener

OSLO_TOPICS = ("notifications", "versioned_notifications")
OSLO_SCHEMES = ("rabbit", "amqp")


def oslo_url(url: str, exchange: str, *, durable: bool = False) -> str:
    """The Keel transport URL for one oslo exchange on the broker at ``url``."""
    parts = urlsplit(url)
    if parts.scheme not in OSLO_SCHEMES:
        raise ConfigError(
            f"oslo notifications come over RabbitMQ: expected rabbit://user:pass@host:5672/, "
            f"not a {parts.scheme or 'scheme-less'} URL"
        )
    if not exchange or any(c in exchange for c in "&=# "):
        raise ConfigError(f"bad oslo exchange name {exchange!r}")
    query = dict(parse_qsl(parts.query))
    query["exchange"] = exchange
    query.setdefault("exchange_durable", "true" if durable else "false")
    # The services declare classic queues unless they run rabbit_quorum_queue (then say
    # queue_type=quorum in the URL): a multi-host URL must not turn ours quorum by itself.
    if "," in parts.netloc:
        query.setdefault("queue_type", "classic")
    return urlunsplit(parts._replace(query=urlencode(query)))


def oslo_listener(
    hub: Hub,
    transport: Transport,
    *,
    topics: Sequence[str] = OSLO_TOPICS,
    pool: str = "keel-hub",
    durable: bool = False,
    max_concurrency: int = 256,
    commit_patience: float = COMMIT_PATIENCE,
) -> OsloNotificationListener:
    """An OsloNotificationListener (not started) that ingests ``topics`` into ``hub``.

    ``transport`` is a RabbitMQ transport on the services' exchange (see `oslo_url`).
    """
    return OsloNotificationListener(
        transport,
        [Target(t) for t in topics],
        [Endpoint(hub, patience=commit_patience)],
        pool=pool,
        durable=durable,
        max_concurrency=max_concurrency,
        service="keel-hub",
    )
