"""Per-transport state the core keeps once: the declared-queue cache and the reply router.

Every RPC client on one transport shares one exclusive reply queue (not one per call); a
reply is matched to its waiting call by request id. A reply for a call that already gave up
is counted and logged, never an error. Queues are declared once before their first use so a
message is never sent to a queue that does not exist yet.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import ConfigError, MalformedMessage
from keel.messaging import _tap
from keel.messaging.transports.base import Delivery, Transport
from keel.wire import Reply, decode_reply, new_id

log = logging.getLogger("keel.messaging")


async def connect(url: str | None = None, **options: Any) -> Transport:
    """Open a transport from a URL (default ``$KEEL_TRANSPORT_URL`` or ``memory://``)."""
    cls, parsed = urls.resolve("transport", url or urls.from_env("transport_url", "memory://"))
    known = getattr(cls, "URL_OPTIONS", None)  # third-party transports may not say
    if known is not None:
        urls.check_options(parsed, known)
    try:
        transport: Transport = cls(parsed, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for {parsed.scheme}:// transport: {exc}") from None
    await transport.connect()
    _tap.install_from_env()
    return transport


class Link:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.declared: set[str] = set()
        self._pending: dict[str, asyncio.Future[Reply]] = {}
        self.reply_to: str | None = None
        self._reply_lock = asyncio.Lock()
        self.late_replies = 0

    async def declare(
        self, name: str, *, durable: bool, bindings: Sequence[str] = (), exclusive: bool = False
    ) -> None:
        if name in self.declared:
            return
        await self.transport.declare_queue(
            name, durable=durable, bindings=bindings, exclusive=exclusive
        )
        self.declared.add(name)

    async def reply_queue(self) -> str:
        if self.reply_to is not None:
            return self.reply_to
        async with self._reply_lock:
            if self.reply_to is None:
                name = f"keel.reply.{new_id()}"
                await self.transport.declare_queue(name, durable=False, exclusive=True)
                await self.transport.consume(name, self._on_reply, prefetch=0, auto_ack=True)
                self.reply_to = name
        return self.reply_to

    def expect(
        self, request_id: str, loop: asyncio.AbstractEventLoop | None = None
    ) -> asyncio.Future[Reply]:
        future: asyncio.Future[Reply] = (loop or asyncio.get_running_loop()).create_future()
        self._pending[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def _on_reply(self, delivery: Delivery) -> None:
        try:
            reply = decode_reply(delivery.body)
        except MalformedMessage as exc:
            event(log, logging.WARNING, "reply.malformed", error=exc)
            return
        future = self._pending.pop(reply.id, None)
        if future is None or future.done():
            self.late_replies += 1
            event(log, logging.INFO, "reply.late", request_id=reply.id, server=reply.server)
        else:
            future.set_result(reply)


_links: weakref.WeakKeyDictionary[Transport, Link] = weakref.WeakKeyDictionary()


def link(transport: Transport) -> Link:
    found = _links.get(transport)
    if found is None:
        found = _links[transport] = Link(transport)
    return found
