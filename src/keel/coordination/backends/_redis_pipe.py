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

Where it connects: ``locate`` (if given) names the server on each (re)connect, so under
Sentinel a reconnect after a failover reaches the new primary; ``ssl`` speaks TLS. With
``wait_replicas`` a `call_replicated` write counts only once ``WAIT`` says that many replicas
hold it (or the primary has no replica left at all, after a failover).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl as _ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import hiredis

from keel.coordination.backends.base import mark_observed
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
        locate: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        wait_replicas: int = 0,
        on_readonly: Callable[[], None] | None = None,
    ) -> None:
        self._on_connect = on_connect
        self._on_readonly = on_readonly
        self._locate = locate
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._wait_replicas = wait_replicas
        self._alone_until = 0.0
        self._where = (host, port)
        self._auth = (username, password)
        self._db = db
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._opening: asyncio.StreamWriter | None = None  # still in its handshake
        self._pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock = asyncio.Lock()

    @property
    def wait_replicas(self) -> int:
        return self._wait_replicas

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            try:
                async with asyncio.timeout(self._timeout):
                    if self._locate is not None:
                        try:
                            self._where = await self._locate()
                        except Exception as exc:  # the sentinels know no primary (yet)
                            raise BackendUnavailable(
                                f"redis: no primary to connect to ({exc}); retry later"
                            ) from exc
                    # Under Sentinel the certificate to check is the located primary's,
                    # not that of the sentinel the URL names first.
                    name = self._where[0] if self._locate is not None else self._server_hostname
                    reader, writer = await asyncio.open_connection(
                        *self._where, ssl=self._ssl, server_hostname=name if self._ssl else None
                    )
            except (OSError, TimeoutError) as exc:
                raise BackendUnavailable(
                    f"redis at {self._where[0]}:{self._where[1]} is unreachable ({exc}); "
                    "retry later"
                ) from exc
            pending: collections.deque[asyncio.Future[Any]] = collections.deque()
            self._pending, self._opening = pending, writer
            self._reader_task = asyncio.create_task(self._read(reader, writer, pending))
            try:
                # The handshake runs before the connection is published: a caller's command
                # sent while AUTH's reply is awaited would reach the server before SELECT.
                username, password = self._auth
                if password is not None:
                    auth = ("AUTH", username, password) if username else ("AUTH", password)
                    await self._handshake(writer, auth)
                if self._db:
                    await self._handshake(writer, ("SELECT", self._db))
                for command in self._on_connect:
                    await self._handshake(writer, command)
            except BaseException:
                # A connection without its scripts (a server still loading, say) is no use:
                # drop it, and the next call connects afresh.
                writer.close()
                raise
            finally:
                self._opening = None
            self._writer = writer
            return writer

    async def _handshake(self, writer: asyncio.StreamWriter, args: tuple[Any, ...]) -> None:
        [reply] = await self._answers(self._write(writer, args))
        if isinstance(reply, hiredis.ReplyError):
            raise reply

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
                    if not pending:  # a reply nobody asked for: out of step, hang up
                        return
                    future = pending.popleft()
                    if not future.done():
                        future.set_result(reply)
                    if (
                        self._locate is not None
                        and isinstance(reply, hiredis.ReplyError)
                        and str(reply).startswith("READONLY")
                    ):
                        # Under Sentinel: the located primary is a replica (demoted, or named
                        # by a sentinel with a wrong view). Hang up, so that the next call
                        # locates again instead of writing to a replica for good.
                        if self._on_readonly is not None:
                            self._on_readonly()
                        return
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
        [reply] = await self._answers(self._write(writer, args))
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    async def _answers(self, *futures: asyncio.Future[Any]) -> list[Any]:
        """The replies of commands written together, within one timeout."""
        try:
            async with asyncio.timeout(self._timeout):
                return [await future for future in futures]
        except TimeoutError as exc:
            raise BackendUnavailable(
                f"redis at {self._where[0]}:{self._where[1]} did not answer in {self._timeout}s"
            ) from exc

    async def call_replicated(self, *args: Any) -> Any:
        """`call`, then ``WAIT wait_replicas`` on the same connection: the reply counts only
        once that many replicas hold the write (see the module docstring)."""
        if self._wait_replicas == 0:
            return await self.call(*args)
        if self._alone_until:  # alone a moment ago: WAIT would only time out
            if time.monotonic() < self._alone_until or not await self._replica_online():
                self._alone_until = max(self._alone_until, time.monotonic() + 2.0)
                return await self.call(*args)
            self._alone_until = 0.0
        writer = self._writer or await self._connect()
        reply = self._write(writer, args)
        waited = self._write(writer, ("WAIT", self._wait_replicas, 2000))
        # Retrieved even when the reply above fails first (the hang-up fails both).
        mark_observed(waited)
        result, counted = await self._answers(reply, waited)
        if isinstance(result, hiredis.ReplyError):
            raise result
        if isinstance(counted, hiredis.ReplyError):  # e.g. a replica now: reconnect
            await self.close()
            raise BackendUnavailable(f"redis: WAIT refused ({counted}); retry later")
        if not isinstance(counted, int):  # a proxy or a foreign server in between
            await self.close()
            raise BackendUnavailable(f"redis: WAIT answered {counted!r}, not a count; retry later")
        replicas = counted
        if replicas < self._wait_replicas:
            if await self._replica_online():
                raise BackendUnavailable(
                    f"redis at {self._where[0]}:{self._where[1]}: a write reached {replicas} "
                    f"of {self._wait_replicas} replicas in time; it may or may not be kept"
                )
            self._alone_until = time.monotonic() + 2.0  # alone: WAIT would only time out
        return result

    async def _replica_online(self) -> bool:
        """Whether the primary has a replica in sync (one still loading its first copy
        cannot acknowledge a WAIT yet)."""
        info = await self.call("INFO", "replication")
        text = info.decode() if isinstance(info, bytes) else str(info)
        return re.search(r"^slave\d+:.*state=online", text, re.MULTILINE) is not None

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
        if self._opening is not None:  # its handshake fails with the hang-up
            self._opening.close()
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()
                await writer.wait_closed()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
