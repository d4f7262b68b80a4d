"""A pipelined Redis connection for the lock scripts: one socket, requests written in call
order, replies matched first-in first-out, parsed by hiredis.

Why not redis-py's pool for these: a lock cycle is two script calls, and redis-py's per-command
machinery (pool checkout, retry wrapper, a timeout task per write) cost about as much as the
round trip. Pipelining also lets a release be sent without waiting for its reply: the next
command on this socket is ordered after it, so this client never sees its own stale lock.

Failure semantics: a dropped connection fails every pending reply with `BackendUnavailable`,
including those of requests sent without waiting (`send` returns a future for the reply, which
the caller may watch to retry). The next call reconnects. A call that times out leaves its
slot in the queue, so later replies still match their requests. An error reply is raised (or
set on the future) as the ``hiredis.ReplyError`` it is: the backend maps it, with every other
foreign error, in `keel.coordination.backends.base.map_errors`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import hiredis

from keel.errors import BackendUnavailable


def encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Pipe:
    """One pipelined connection; `call` awaits a reply, `send` does not. ``on_connect``
    commands run on every new connection (e.g. loading scripts a restart forgot)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        db: int,
        timeout: float,
        on_connect: tuple[tuple[Any, ...], ...] = (),
    ) -> None:
        self._on_connect = on_connect
        self._where = (host, port)
        self._auth = (username, password)
        self._db = db
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            try:
                async with asyncio.timeout(self._timeout):
                    reader, writer = await asyncio.open_connection(*self._where)
            except (OSError, TimeoutError) as exc:
                raise BackendUnavailable(
                    f"redis at {self._where[0]}:{self._where[1]} is unreachable ({exc}); "
                    "retry later"
                ) from exc
            pending: collections.deque[asyncio.Future[Any]] = collections.deque()
            self._writer, self._pending = writer, pending
            self._reader_task = asyncio.create_task(self._read(reader, writer, pending))
            try:
                username, password = self._auth
                if password is not None:
                    auth = ("AUTH", username, password) if username else ("AUTH", password)
                    await self.call(*auth)
                if self._db:
                    await self.call("SELECT", self._db)
                for command in self._on_connect:
                    await self.call(*command)
            except BaseException:
                # A connection without its scripts (a server still loading, say) is no use:
                # drop it, and the next call connects afresh.
                if self._writer is writer:
                    self._writer = None
                writer.close()
                raise
            return writer

    async def _read(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: collections.deque[asyncio.Future[Any]],
    ) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = pending.popleft()
                    if not future.done():
                        future.set_result(reply)
        except (OSError, hiredis.ProtocolError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            gone = BackendUnavailable(f"redis at {self._where[0]}:{self._where[1]} hung up")
            while pending:
                future = pending.popleft()
                if not future.done():
                    future.set_exception(gone)

    def _write(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(future)
        writer.write(encode(args))
        return future

    async def call(self, *args: Any) -> Any:
        """Send a command and return its reply (an error reply raises ``hiredis.ReplyError``)."""
        writer = self._writer or await self._connect()
        future = self._write(writer, args)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await future
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"redis at {self._where[0]}:{self._where[1]} did not answer in {self._timeout}s"
            ) from exc
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    async def send(self, *args: Any) -> asyncio.Future[Any]:
        """Send a command now, without waiting: the future of its reply (an error reply, a
        dropped connection or no answer within the timeout is set as its exception)."""
        writer = self._writer or await self._connect()
        reply = self._write(writer, args)
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[Any]) -> None:
            timer.cancel()
            if outcome.done():
                return
            if done.cancelled():
                outcome.set_exception(BackendUnavailable("redis: the reply was abandoned"))
            elif (exc := done.exception()) is not None:
                outcome.set_exception(exc)
            elif isinstance(result := done.result(), hiredis.ReplyError):
                outcome.set_exception(result)
            else:
                outcome.set_result(result)

        def late() -> None:
            if not outcome.done():
                outcome.set_exception(
                    BackendUnavailable(
                        f"redis at {self._where[0]}:{self._where[1]} did not answer in "
                        f"{self._timeout}s"
                    )
                )

        timer = asyncio.get_running_loop().call_later(self._timeout, late)
        reply.add_done_callback(settle)
        return outcome

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
                await writer.wait_closed()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
