"""Per-transport state the core keeps once: the declared-queue cache and the reply router.

Every RPC client on one transport shares one exclusive reply queue (not one per call); a
reply is matched to its waiting call by request id. A reply for a call that already gave up
is counted and logged, never an error. A body on the reply queue that is not a reply this
side reads is counted and logged (keel.messaging._poison), and if its first bytes name a
waiting call, that call fails at once with `MalformedMessage` instead of waiting for its
deadline; the reply consumer goes on. Queues are declared once before their first use so a
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
from keel.messaging import _poison, _tap
from keel.messaging._failures import to_failure
from keel.messaging.transports.base import Delivery, Transport
from keel.wire import ENVELOPE_VERSION, Reply, decode_reply, new_id, reply_id

log = logging.getLogger("keel.messaging")


async def connect(url: str | None = None, **options: Any) -> Transport:
    """Open a transport from a URL (default ``$KEEL_TRANSPORT_URL`` or ``memory://``)."""
    cls, parsed = urls.resolve("transport", url or urls.from_env("transport_url", "memory://"))
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

    def forget(self, request_id: str, future: asyncio.Future[Reply] | None = None) -> None:
        """Stop waiting for ``request_id``. With its ``future``: make sure nothing it holds is
        reported as lost (a send that outlived the call's deadline leaves the deadline's
        TimeoutError in a future nobody awaited)."""
        self._pending.pop(request_id, None)
        if future is not None:
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()

    def _on_reply(self, delivery: Delivery) -> None:
        queue = self.reply_to or "reply"
        try:
            reply = decode_reply(delivery.body, self.transport.max_message_bytes)
        except MalformedMessage as exc:
            self._unreadable(delivery.body, queue, exc)
            return
        except Exception as exc:  # the decoder is total; this is a bug, handled the same
            self._unreadable(delivery.body, queue, _poison.crashed("reply", exc))
            return
        future = self._pending.pop(reply.id, None)
        if future is None or future.done():
            self.late_replies += 1
            event(log, logging.INFO, "reply.late", request_id=reply.id, server=reply.server)
        else:
            future.set_result(reply)

    def _unreadable(self, body: bytes, queue: str, exc: MalformedMessage) -> None:
        request_id = reply_id(body)
        future = self._pending.pop(request_id, None) if request_id is not None else None
        why = _poison.note(log, "reply", queue, exc, len(body), request_id=request_id)
        if future is not None and not future.done():
            # The waiting call raises this as if the server had: MalformedMessage, now.
            unreadable = MalformedMessage(
                f"the reply to request {request_id} could not be read: {why}",
                problem=getattr(exc, "problem", "internal"),
            )
            failure = to_failure(unreadable, with_traceback=False)
            future.set_result(Reply(ENVELOPE_VERSION, request_id or "", None, failure))


_links: weakref.WeakKeyDictionary[Transport, Link] = weakref.WeakKeyDictionary()


def link(transport: Transport) -> Link:
    found = _links.get(transport)
    if found is None:
        found = _links[transport] = Link(transport)
    return found
