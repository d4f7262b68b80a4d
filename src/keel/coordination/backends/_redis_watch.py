"""One Redis pub/sub connection per coordinator, shared by every observer of every key.

The lock scripts publish on ``keel-ev:<key>`` (and on the parent's channel) whenever a key
changes holder, so observers wait for a message instead of polling. Each channel keeps a
generation number; an observer remembers the one it last saw and returns as soon as it moves.

Failure semantics: a subscription is confirmed by the server before `Subscriber.listen`
returns, so a change made after it is never missed while the connection lasts. When the
connection drops, every channel's generation moves (observers wake and re-read: nothing that
happened during the outage is missed either), and the connection is re-made and every
channel subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from keel.coordination.backends._redis_pipe import encode

_CONFIRM = 2.0  # how long listen() waits for the server to confirm a subscription
_RECONNECT = 0.1


class Subscriber:
    """Channels subscribed on one connection, with a generation number each."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        locate: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self._where = (host, port)
        self._auth = (username, password)
        self._locate = locate  # under Sentinel: the primary's address on each (re)connect
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._refs: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._moved: dict[str, asyncio.Event] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def generation(self, channel: str) -> int:
        return self._gen.get(channel, 0)

    async def listen(self, channel: str) -> None:
        """Subscribe (counted); returns once the server confirmed it, or after a short wait
        when it cannot be reached (observers then wake only by their timeouts)."""
        self._refs[channel] = self._refs.get(channel, 0) + 1
        if self._refs[channel] > 1:
            return
        confirmed = self._confirmed[channel] = asyncio.Event()
        if self._writer is not None:
            self._writer.write(encode(("SUBSCRIBE", channel)))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_CONFIRM):
                await confirmed.wait()

    def unlisten(self, channel: str) -> None:
        self._refs[channel] -= 1
        if self._refs[channel] > 0:
            return
        del self._refs[channel]
        self._confirmed.pop(channel, None)
        if self._writer is not None:
            self._writer.write(encode(("UNSUBSCRIBE", channel)))

    async def changed(self, channel: str, since: int, timeout: float) -> None:
        """Return once the channel's generation differs from ``since``, or after ``timeout``."""
        if self._gen.get(channel, 0) != since:
            return
        moved = self._moved.setdefault(channel, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout)):
                await moved.wait()

    def _move(self, channel: str) -> None:
        self._gen[channel] = self._gen.get(channel, 0) + 1
        moved = self._moved.pop(channel, None)
        if moved is not None:
            moved.set()

    async def _run(self) -> None:
        while not self._closed and self._refs:
            with contextlib.suppress(OSError, hiredis.ProtocolError, TimeoutError):
                await self._session()
            self._writer = None
            for channel in list(self._refs):
                self._move(channel)  # anything may have happened while disconnected
            if self._closed or not self._refs:
                return
            await asyncio.sleep(_RECONNECT)

    async def _session(self) -> None:
        async with asyncio.timeout(5):
            if self._locate is not None:
                try:
                    self._where = await self._locate()
                except Exception as exc:  # the sentinels know no primary (yet): try again
                    raise OSError(f"redis pub/sub: no primary ({exc})") from exc
            reader, writer = await asyncio.open_connection(
                *self._where,
                ssl=self._ssl,
                server_hostname=self._server_hostname if self._ssl else None,
            )
        try:
            username, password = self._auth
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                writer.write(encode(auth))
            for channel in self._refs:
                writer.write(encode(("SUBSCRIBE", channel)))
            self._writer = writer
            parser = hiredis.Reader()
            while data := await reader.read(65536):
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    self._handle(reply)
        finally:
            writer.close()

    def _handle(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            raise OSError(f"redis pub/sub: {reply}")
        if not isinstance(reply, list) or len(reply) < 3:
            return
        kind, channel = reply[0], reply[1].decode()
        if kind == b"message":
            self._move(channel)
        elif kind == b"subscribe":
            confirmed = self._confirmed.get(channel)
            if confirmed is not None:
                confirmed.set()

    async def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
