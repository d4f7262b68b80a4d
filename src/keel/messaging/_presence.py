"""Server presence: which servers of a topic run, in which state, serving which versions.

Servers announce themselves on ``keel.presence.<topic>`` when they start, every
``interval`` seconds, when they start draining and when they stop. Clients with
``version_cap="auto"`` listen and cap the versions they send at the lowest version the
serving servers offer, so during a rolling upgrade new clients keep talking the old dialect
until the last old server is gone. Announcements are at-most-once: a server not heard from
for three intervals is forgotten, and a lost "stopped" announcement only delays the cap's
move by that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable

import msgspec

from keel._log import event
from keel.errors import KeelError
from keel.messaging._target import parse_version
from keel.messaging.transports.base import Delivery, Transport
from keel.wire import ENVELOPE_VERSION, new_id

log = logging.getLogger("keel.messaging.presence")

DEFAULT_INTERVAL = 2.0
PROBE_GATHER = 0.1  # seconds to keep collecting probe answers after the first one


class Presence(msgspec.Struct, array_like=True):
    v: int
    topic: str
    server: str
    state: str
    versions: dict[str, str]  # namespace ("" for none) -> "X.Y"
    interval: float
    at: float


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Presence)


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
        self._transport = transport
        self._topic = topic
        self._server = server
        self._versions = versions
        self._state = state
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._probe_queue: str | None = None

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
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def _on_probe(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self.announce())
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.announce()

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
        try:
            presence = _decoder.decode(delivery.body)
        except msgspec.DecodeError:
            event(log, logging.WARNING, "presence.malformed", topic=self._topic)
            return
        if presence.state == "stopped":
            self._servers.pop(presence.server, None)
        else:
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
