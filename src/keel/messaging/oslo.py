"""OpenStack notifications on the wire as oslo.messaging writes them, read and written by Keel.

The codec (pure functions and msgspec Structs, no I/O):

* ``decode_message(body)`` reads what oslo.messaging's rabbit driver publishes: the messaging
  2.0 envelope ``{"oslo.version": "2.0", "oslo.message": "<JSON string>"}`` (driver
  ``messagingv2``) or the bare 1.0 dict (driver ``messaging``). The inner dict holds
  ``message_id``, ``publisher_id``, ``event_type``, ``priority`` (``INFO``...), ``payload``
  (a legacy dict or a versioned ``nova_object.*`` dict: both are handed over as they are),
  ``timestamp`` and the request context flattened into ``_context_<key>`` entries.
  Reading is total and bounded as Keel's own envelope is (keel.wire): a body over the
  reader's ``max_message_bytes`` is refused unread, nesting is bounded to `wire.MAX_DEPTH`
  levels of payload, integers to what msgpack carries (64 bits), and anything else that is
  not such a notification is `MalformedMessage` with the reason.
* ``encode_message(message)`` writes the 2.0 envelope the same way.
* ``context_from_oslo`` / ``context_to_oslo`` map oslo.context's dict (``user_id``/``user``,
  ``project_id``/``tenant``/``project``, ``roles``, ``request_id``, ...) to Keel's `RequestContext`;
  keys Keel has no field for travel in ``RequestContext.extra``; credentials are dropped.

On a transport (``OsloNotificationListener``, ``OsloNotifier``) the names are oslo's: a
notification for topic ``notifications`` and priority ``info`` is published to the topic
exchange of the service (``nova``, ``openstack``: the transport URL's ``?exchange=``) with
routing key ``notifications.info``; a listener without a pool consumes queue
``notifications.info``, one with a pool consumes one queue named after the pool bound to every
``<topic>.<priority>`` it listens to. oslo.messaging declares exchanges and queues durable only
with ``amqp_durable_queues = True`` (default False): pass the same ``durable`` here and
``exchange_durable=false`` in the URL, or RabbitMQ refuses the second declaration.

Delivery is that of `keel.messaging.NotificationListener` (at-least-once, ack after the
handlers return, ``REQUEUE``, dead letters to ``<queue>.dlq``, malformed input dead-lettered
with the reason). `OsloNotifier` returns once the broker confirmed the notification.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from keel import wire
from keel.errors import ConfigError, MalformedMessage, MessageTooLarge, SerializationError
from keel.messaging._link import link
from keel.messaging._notify import PRIORITIES, NotificationListener, Notifier
from keel.messaging._target import Target
from keel.messaging.transports.base import Transport
from keel.wire import ENVELOPE_VERSION, Notification, RequestContext, new_id

__all__ = [
    "OSLO_CONTEXT_KEY",
    "OsloMessage",
    "OsloNotificationListener",
    "OsloNotifier",
    "context_from_oslo",
    "context_to_oslo",
    "decode_message",
    "encode_message",
]

ENVELOPE_VERSION_KEY = "oslo.version"
MESSAGE_KEY = "oslo.message"
OSLO_ENVELOPE_VERSION = "2.0"
CONTEXT_PREFIX = "_context_"
UNIQUE_ID_KEY = "_unique_id"

# oslo.messaging sanitizes these before sending; Keel drops them too if they ever arrive.
_SECRET_KEYS = frozenset({"auth_token", "auth_token_info", "service_token", "password"})
# Context keys that become RequestContext fields (the rest goes to ``extra``).
_MAPPED_KEYS = frozenset(
    {"user", "user_id", "project", "project_id", "tenant", "roles", "request_id"}
)
_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class OsloEnvelope(msgspec.Struct):
    """oslo.messaging's 2.0 envelope: the message is a JSON string inside a JSON object."""

    version: str = msgspec.field(name=ENVELOPE_VERSION_KEY)
    message: str = msgspec.field(name=MESSAGE_KEY)


class OsloMessage(msgspec.Struct, kw_only=True):
    """One notification as oslo.messaging carries it (context unflattened)."""

    message_id: str
    publisher_id: str
    event_type: str
    priority: str  # as sent: oslo's Notifier sends it upper case
    payload: Any
    timestamp: str
    context: dict[str, Any] = {}
    unique_id: str | None = None


_json_decoder = msgspec.json.Decoder()
_envelope_decoder = msgspec.json.Decoder(OsloEnvelope)
_REQUIRED = ("message_id", "publisher_id", "event_type", "priority", "timestamp")


# 2**63 has 19 digits: shorter runs are in range, longer ones a walk checks
_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGIT_BYTES = re.compile(rb"[0-9]{19}")


def _may_nest(text: str) -> bool:
    limit = wire.MAX_DEPTH
    return len(text) > limit and text.count("[") + text.count("{") > limit


def _needs_walk(data: bytes | str) -> bool:
    """Whether the JSON might nest deeper than MAX_DEPTH or hold an integer past 64 bits."""
    if isinstance(data, str):
        return _may_nest(data) or _LONG_DIGITS.search(data) is not None
    nests = wire.may_nest(data, wire.NOT_JSON_OPENERS)
    return nests or _LONG_DIGIT_BYTES.search(data) is not None


def _json(data: bytes | str, what: str) -> Any:
    """JSON to Python values within Keel's bounds, or `MalformedMessage` saying which."""
    many = (
        wire.openers(data, wire.NOT_JSON_OPENERS)
        if isinstance(data, bytes)
        else data.count("[") + data.count("{")
    ) > wire.COLLECTOR_PAUSE_OPENERS
    with wire.collector_paused(many):
        try:
            value = _json_decoder.decode(data)
        except RecursionError:
            problem, reason = "depth", "nested deeper than this reader's recursion limit"
        except msgspec.DecodeError as exc:  # out-of-range numbers are ValidationErrors
            problem = "range" if "out of range" in str(exc) else "syntax"
            reason = f"not JSON ({exc})"
        except (ValueError, OverflowError, MemoryError, TypeError) as exc:
            problem, reason = "syntax", f"not JSON ({type(exc).__name__}: {exc})"
        else:
            found = (
                wire.bounds_problem([(value, wire.MAX_DEPTH + 1)], ints=True)
                if _needs_walk(data)
                else None
            )
            if found is None:
                return value
            del value  # freed here, with the collector still paused
            raise wire.bounds_error(what, found, len(data))
    raise MalformedMessage(f"{what}: {reason}"[:400], problem=problem)


def decode_message(body: bytes, limit: int | None = None) -> OsloMessage:
    """Read an oslo notification (2.0 envelope or 1.0 dict); `MalformedMessage` otherwise.

    ``limit`` (the reader's ``max_message_bytes``) refuses a longer body without reading it.
    """
    if limit is not None and len(body) > limit:
        raise wire.oversize("oslo notification", len(body), limit)
    outer = _json(body, "not an oslo notification")
    if not isinstance(outer, dict):
        raise MalformedMessage(
            "not an oslo notification: the JSON is not an object", problem="shape"
        )
    inner: Any = outer
    if ENVELOPE_VERSION_KEY in outer:
        try:
            envelope = msgspec.convert(outer, OsloEnvelope)
        except msgspec.ValidationError as exc:
            raise MalformedMessage(
                f"broken oslo.messaging envelope: {exc}", problem="shape"
            ) from None
        inner = _json(envelope.message, "broken oslo.messaging envelope")
        if envelope.version.partition(".")[0] != OSLO_ENVELOPE_VERSION.partition(".")[0]:
            raise MalformedMessage(
                f"oslo.messaging envelope version {envelope.version[:20]!r}; Keel reads 2.x",
                problem="version",
            )
        if not isinstance(inner, dict):
            raise MalformedMessage("oslo.message is not a JSON object", problem="shape")
    missing = [key for key in _REQUIRED if not isinstance(inner.get(key), str)]
    if missing or "payload" not in inner:
        keys = ", ".join(key[:40] for key in sorted(map(str, inner))[:12])
        raise MalformedMessage(
            f"oslo notification without {', '.join(missing) or 'payload'} (keys: {keys})",
            problem="shape",
        )
    context = {
        key[len(CONTEXT_PREFIX) :]: value
        for key, value in inner.items()
        if key.startswith(CONTEXT_PREFIX)
    }
    unique_id = inner.get(UNIQUE_ID_KEY)
    return OsloMessage(
        message_id=inner["message_id"],
        publisher_id=inner["publisher_id"],
        event_type=inner["event_type"],
        priority=inner["priority"],
        payload=inner["payload"],
        timestamp=inner["timestamp"],
        context=context,
        unique_id=unique_id if isinstance(unique_id, str) else None,
    )


def _enc_hook(obj: Any) -> Any:
    raise SerializationError(
        f"cannot put a value of type {type(obj).__qualname__} in an oslo notification; "
        "send JSON types (dict, list, str, int, float, bool, None)",
        value_type=type(obj).__qualname__,
    )


_json_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def encode_message(message: OsloMessage) -> bytes:
    """The 2.0 envelope oslo.messaging's ``messagingv2`` driver writes, as JSON bytes."""
    inner: dict[str, Any] = {
        "message_id": message.message_id,
        "publisher_id": message.publisher_id,
        "event_type": message.event_type,
        "priority": message.priority,
        "payload": message.payload,
        "timestamp": message.timestamp,
    }
    for key, value in message.context.items():
        inner[CONTEXT_PREFIX + key] = value
    inner[UNIQUE_ID_KEY] = message.unique_id or uuid.uuid4().hex
    try:
        text = _json_encoder.encode(inner).decode()
    except RecursionError:
        text = ""
    # Readers refuse what nests deeper than wire.MAX_DEPTH: say so here, to the sender.
    if not text or (_may_nest(text) and wire.nesting_problem(inner, wire.MAX_DEPTH + 1)):
        raise SerializationError(
            f"cannot send a payload nested more than {wire.MAX_DEPTH} containers deep; "
            "flatten it or send a reference",
            limit=wire.MAX_DEPTH,
        )
    return _json_encoder.encode(OsloEnvelope(OSLO_ENVELOPE_VERSION, text))


OSLO_CONTEXT_KEY = "oslo_context"  # RequestContext.extra key of a verbatim oslo context


def context_from_oslo(context: Mapping[str, Any], *, verbatim: bool = False) -> RequestContext:
    """oslo.context's dict (as a notification carries it) to a Keel `RequestContext`.

    With ``verbatim`` (the oslo.messaging driver's RPC), ``extra`` holds the whole dict,
    credentials included, under `OSLO_CONTEXT_KEY`, so an oslo endpoint gets back exactly
    what its caller sent (nova forwards ``auth_token`` over RPC) and a Keel endpoint's nested
    call passes it on; the mapped fields are filled either way.
    """
    user = context.get("user_id") or context.get("user")
    project = context.get("project_id") or context.get("tenant") or context.get("project")
    roles = context.get("roles") or ()
    request_id = context.get("request_id")
    traceparent = context.get("traceparent")
    if verbatim:
        extra: dict[str, Any] = {OSLO_CONTEXT_KEY: dict(context)}
    else:
        extra = {
            key: value
            for key, value in context.items()
            if key not in _MAPPED_KEYS and key not in _SECRET_KEYS and key != "traceparent"
        }
    fields: dict[str, Any] = {
        "user": str(user) if user is not None else None,
        "project": str(project) if project is not None else None,
        "roles": tuple(str(r) for r in roles) if isinstance(roles, list | tuple) else (),
        "extra": extra,
    }
    if isinstance(request_id, str) and request_id:
        fields["request_id"] = request_id
    if isinstance(traceparent, str) and _TRACEPARENT.match(traceparent):
        fields["traceparent"] = traceparent
    return RequestContext(**fields)


def context_to_oslo(ctx: RequestContext) -> dict[str, Any]:
    """A Keel `RequestContext` as the dict oslo.context's ``to_dict`` would give (the
    verbatim oslo dict when the context came from oslo, see `context_from_oslo`)."""
    kept = ctx.extra.get(OSLO_CONTEXT_KEY)
    if isinstance(kept, dict):
        return dict(kept)
    out: dict[str, Any] = {
        key: value for key, value in ctx.extra.items() if key not in _SECRET_KEYS
    }
    out.update(
        user=ctx.user,
        user_id=ctx.user,
        tenant=ctx.project,
        project=ctx.project,
        project_id=ctx.project,
        roles=list(ctx.roles),
        request_id=ctx.request_id,
        traceparent=ctx.traceparent,
    )
    return out


def oslo_timestamp(now: datetime | None = None) -> str:
    """``str(timeutils.utcnow())`` as oslo writes it: naive UTC, space-separated."""
    return str((now or datetime.now(UTC)).replace(tzinfo=None))


def to_keel(message: OsloMessage, *, verbatim: bool = False) -> Notification:
    return Notification(
        ENVELOPE_VERSION,
        message.message_id,
        message.publisher_id,
        message.event_type,
        message.priority.lower(),
        message.payload,
        message.timestamp,
        context_from_oslo(message.context, verbatim=verbatim),
    )


class OsloNotificationListener(NotificationListener):
    """A `NotificationListener` for notifications published by oslo.messaging.

    Same endpoints, same delivery; queues named as oslo names them (see the module). The
    transport's exchange (``?exchange=nova``) is the one the services publish to.
    """

    def __init__(
        self,
        transport: Transport,
        targets: Sequence[Target],
        endpoints: Sequence[object],
        *,
        pool: str | None = None,
        durable: bool = False,
        pool_queue_per_subject: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(transport, targets, endpoints, pool=pool, **options)
        self.durable = durable
        # oslo names one queue per pool, bound to every subject; a transport that binds a
        # durable queue to one subject only (NATS) gets one pool queue per subject instead.
        self._per_subject = pool_queue_per_subject

    def _decode(self, body: bytes) -> Notification:
        return to_keel(decode_message(body, self.transport.max_message_bytes))

    async def start(self) -> None:
        lk = link(self.transport)
        subjects = [f"{topic}.{priority}" for topic in self.topics for priority in self._handlers]
        # oslo: without a pool one queue per routing key, with a pool one queue for them all.
        if not self.pool:
            queues = {s: [s] for s in subjects}
        elif self._per_subject:
            queues = {f"{s}.pool.{self.pool}": [s] for s in subjects}
        else:
            queues = {self.pool: subjects}
        for queue, bindings in queues.items():
            await lk.declare(queue, durable=self.durable, bindings=bindings)
            self._consumers.append(
                await self.transport.consume(
                    queue, self._handler(queue), prefetch=self.max_concurrency
                )
            )


class OsloNotifier(Notifier):
    """A `Notifier` that publishes in oslo.messaging's ``messagingv2`` format.

    Like oslo's rabbit driver it declares the default queue ``<topic>.<priority>`` so
    notifications wait for a listener that is not running yet.
    """

    def __init__(
        self,
        transport: Transport,
        publisher_id: str,
        *,
        topics: Sequence[str] = ("notifications",),
        service: str | None = None,
        durable: bool = False,
        window: int = 0,
    ) -> None:
        super().__init__(transport, publisher_id, topics=topics, service=service, window=window)
        self.durable = durable

    def prepare(self, *, publisher_id: str) -> OsloNotifier:
        return OsloNotifier(
            self.transport,
            publisher_id,
            topics=self.topics,
            service=self.service,
            durable=self.durable,
            window=self.window,
        )

    async def notify(
        self, ctx: RequestContext | None, event_type: str, payload: Any, priority: str
    ) -> None:
        priority = priority.lower()
        if priority not in PRIORITIES:
            raise ConfigError(f"priority {priority!r} is not one of {', '.join(PRIORITIES)}")
        ctx = ctx or RequestContext(service=self.service or None)
        body = encode_message(
            OsloMessage(
                message_id=str(uuid.uuid4()),
                publisher_id=self.publisher_id,
                event_type=event_type,
                priority=priority.upper(),
                payload=payload,
                timestamp=oslo_timestamp(),
                context=context_to_oslo(ctx),
                unique_id=new_id(),
            )
        )
        limit = self.transport.max_message_bytes
        if len(body) > limit:
            raise MessageTooLarge(
                f"notification is {len(body)} bytes, over the transport's {limit}-byte limit",
                size=len(body),
                limit=limit,
            )
        for topic in self.topics:
            await self.publish(f"{topic}.{priority}", body)
        self.counts["keel_notifications", priority, "published"] += 1

    async def publish(self, subject: str, body: bytes) -> None:
        """Publish an encoded oslo notification to ``<topic>.<priority>``, declaring its
        default queue first as oslo does; returns once the broker holds it (or, with a
        ``window``, once it is on its way: see `Notifier`)."""
        await self._link.declare(subject, durable=self.durable, bindings=[subject])
        publish = getattr(self.transport, "publish_json", self.transport.publish)
        await self._send(lambda: publish(subject, body, durable=True))
