"""Server presence: which servers of a topic run, in which state, serving which versions.

Servers announce themselves on ``keel.presence.<topic>`` when they start, every
``interval`` seconds, when they start draining and when they stop. Clients with
``version_cap="auto"`` listen and cap the versions they send at the lowest version the
serving servers offer, so during a rolling upgrade new clients keep talking the old dialect
until the last old server is gone. Announcements are at-most-once: a server not heard from
for three intervals is forgotten, and a lost "stopped" announcement only delays the cap's
move by that long. Anyone who can publish can announce, so a client believes only what a
Keel server could have said: an interval between 0 and an hour, ``MAJOR.MINOR`` versions in
ASCII digits, a short state, the topic of the subject it came on, at most `MAX_BYTES`, at
most `MAX_SERVERS` servers per topic; anything else is counted and dropped
(keel.messaging._poison), so no malformed announcement pins or lifts a cap. What this cannot
stop: anyone who can publish on ``keel.presence.<topic>`` can announce a well-formed server
that holds the cap down for three of the intervals it claims (up to `MAX_INTERVAL`), or say
"stopped" for a real server until its next announcement; only the broker's permissions
(who may publish on ``keel.presence.>``) keep that out. Probes are answered at most one at a
time per server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable
from typing import Annotated

import msgspec
from msgspec import Meta

from keel import wire
from keel._log import event
from keel.errors import ConfigError, KeelError, MalformedMessage
from keel.messaging import _poison
from keel.messaging._target import parse_version
from keel.messaging.transports.base import Delivery, Transport, observe
from keel.wire import ENVELOPE_VERSION, new_id

log = logging.getLogger("keel.messaging.presence")

DEFAULT_INTERVAL = 2.0
PROBE_GATHER = 0.1  # seconds to keep collecting probe answers after the first one
MAX_SERVERS = 1024  # servers one watch remembers per topic
MAX_INTERVAL = 3600.0
# The largest announcement a server writes (256 namespaces of 256 characters) is under 80 KiB.
MAX_BYTES = 128 * 1024

_Name = Annotated[str, Meta(max_length=256)]
_State = Annotated[str, Meta(max_length=32, pattern=r"^[a-z_]+\Z")]
_Version = Annotated[str, Meta(pattern=r"^[0-9]{1,9}\.[0-9]{1,9}\Z")]


class Presence(msgspec.Struct, array_like=True):
    v: Annotated[int, Meta(ge=1, le=ENVELOPE_VERSION)]
    topic: _Name
    server: _Name
    state: _State
    versions: Annotated[dict[_Name, _Version], Meta(max_length=256)]  # namespace -> "X.Y"
    interval: Annotated[float, Meta(gt=0.0, le=MAX_INTERVAL)]
    at: Annotated[float, Meta(ge=0.0, le=1e11)]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Presence)


def decode_presence(body: bytes, limit: int | None = None, *, topic: str | None = None) -> Presence:
    """An announcement (for ``topic``, if given), or `MalformedMessage` with the reason (total,
    bounded)."""
    presence = wire.decode_bounded(_decoder, body, "presence announcement", limit)
    if topic is not None and presence.topic != topic:
        raise MalformedMessage(
            f"presence announcement for topic {presence.topic[:64]!r} on the subject of {topic!r}",
            problem="shape",
        )
    return presence


def subject(topic: str) -> str:
    return f"keel.presence.{topic}"


def probe_subject(topic: str) -> str:
    return f"keel.presence-probe.{topic}"


_pending: set[asyncio.Task[None]] = set()


class Announcer:
    """A server's side: announce now, periodically, and on the way out."""

    def __init__(
        self,
        transport: Transport,
        topic: str,
        server: str,
        versions: Callable[[], dict[str, str]],
        state: Callable[[], str],
        *,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if not 0 < interval <= MAX_INTERVAL:
            raise ConfigError(
                f"presence_interval={interval!r}: clients believe announcements every 0 to "
                f"{MAX_INTERVAL:g} s only"
            )
        self._transport = transport
        self._topic = topic
        self._server = server
        self._versions = versions
        self._state = state
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._probe_queue: str | None = None
        self._answering = False

    async def announce(self, state: str | None = None) -> None:
        body = _encoder.encode(
            Presence(
                ENVELOPE_VERSION,
                self._topic,
                self._server,
                state or self._state(),
                self._versions(),
                self.interval,
                time.time(),
            )
        )
        try:
            await self._transport.publish(subject(self._topic), body, durable=False)
        except KeelError as exc:  # presence is advisory: never fail the server for it
            event(log, logging.INFO, "presence.unsent", server=self._server, error=exc)

    async def start(self) -> None:
        # A new client asks "who is there?" so it need not wait a whole interval to know.
        self._probe_queue = f"{probe_subject(self._topic)}.{self._server}.{new_id()[:8]}"
        await self._transport.declare_queue(
            self._probe_queue, durable=False, exclusive=True, bindings=[probe_subject(self._topic)]
        )
        await self._transport.consume(self._probe_queue, self._on_probe, prefetch=0, auto_ack=True)
        await self.announce()
        self._task = observe(asyncio.get_running_loop().create_task(self._loop()), log)

    def _on_probe(self, delivery: Delivery) -> None:
        # The body is not read. A flood of probes gets one answer at a time, not one each.
        if self._answering:
            return
        self._answering = True
        task = asyncio.get_running_loop().create_task(self._answer())
        _pending.add(task)
        task.add_done_callback(_pending.discard)
        observe(task, log)

    async def _answer(self) -> None:
        try:
            await self.announce()
        finally:
            self._answering = False

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.announce()
            except Exception as exc:  # advisory: the next interval tries again
                event(log, logging.WARNING, "presence.unsent", server=self._server, error=exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._probe_queue is not None:
            await self._transport.delete_queue(self._probe_queue)
            self._probe_queue = None
        await self.announce("stopped")


class VersionWatch:
    """A client's side: the servers of one topic as last announced."""

    def __init__(self, transport: Transport, topic: str) -> None:
        self._transport = transport
        self._topic = topic
        self._servers: dict[str, tuple[Presence, float]] = {}
        self._heard = asyncio.Event()
        self._full = False
        self._started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            queue = f"keel.presence.{self._topic}.watch.{new_id()[:12]}"
            await self._transport.declare_queue(
                queue, durable=False, exclusive=True, bindings=[subject(self._topic)]
            )
            await self._transport.consume(queue, self._on_presence, prefetch=0, auto_ack=True)
            self._started = True
            await self._transport.publish(probe_subject(self._topic), b"?", durable=False)

    def _on_presence(self, delivery: Delivery) -> None:
        body = delivery.body
        try:
            limit = min(MAX_BYTES, self._transport.max_message_bytes)
            presence = decode_presence(body, limit, topic=self._topic)
        except MalformedMessage as exc:
            _poison.note(log, "presence", self._topic, exc, len(body))
            return
        except Exception as exc:  # the decoder is total; this is a bug, handled the same
            _poison.note(log, "presence", self._topic, _poison.crashed("presence", exc), len(body))
            return
        if presence.state == "stopped":
            self._servers.pop(presence.server, None)
        else:
            if presence.server not in self._servers and len(self._servers) >= MAX_SERVERS:
                self.servers()  # forget the expired first
                if len(self._servers) >= MAX_SERVERS:
                    if not self._full:  # said once: a flood of names must not flood the log
                        self._full = True
                        event(log, logging.WARNING, "presence.too_many", topic=self._topic)
                    return
            expires = time.monotonic() + 3 * presence.interval
            self._servers[presence.server] = (presence, expires)
        self._heard.set()

    async def wait_heard(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._heard.wait(), timeout)
        if self._heard.is_set():
            # Answers to the probe come from separate connections in no set order: the first
            # one alone (a new server's) would lift the cap while an old server still runs.
            await asyncio.sleep(PROBE_GATHER)

    def servers(self) -> dict[str, Presence]:
        now = time.monotonic()
        for name, (_, expires) in list(self._servers.items()):
            if expires < now:
                del self._servers[name]
        return {name: presence for name, (presence, _) in self._servers.items()}

    def cap(self, namespace: str | None) -> tuple[int, int] | None:
        """The lowest version of ``namespace`` among serving servers (None: none known)."""
        live = self.servers().values()
        serving = [p for p in live if p.state == "serving"] or list(live)
        found = [
            parse_version(p.versions[namespace or ""])
            for p in serving
            if (namespace or "") in p.versions
        ]
        return min(found) if found else None


_watches: weakref.WeakKeyDictionary[Transport, dict[str, VersionWatch]] = (
    weakref.WeakKeyDictionary()
)


def watch(transport: Transport, topic: str) -> VersionWatch:
    """The one watch per transport and topic, shared by every client that asks."""
    per_topic = _watches.setdefault(transport, {})
    found = per_topic.get(topic)
    if found is None:
        found = per_topic[topic] = VersionWatch(transport, topic)
    return found
