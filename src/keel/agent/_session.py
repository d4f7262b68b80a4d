"""The controller's side of one agent channel: resync, handshake, requests, streams.

The guest is untrusted, so this side bounds everything it holds: a frame over ``max_frame``
is refused before it is buffered, and a frame's buffer grows only as its bytes arrive, within
one budget for every connection of the process (`keel.agent._budget`: over it, a connection
assembling a large frame stops reading until others finish theirs); each stream may have at
most ``window`` unconsumed chunks (a peer sending past its credit is a
`StreamLimitExceeded`); every request has a deadline; a write that the peer does not drain
before the deadline closes the channel; a frame not whole ``frame_timeout`` seconds after its
first byte closes the channel.

Failure semantics: a broken protocol (garbage, an undecodable or too deeply nested frame, a
frame for an id this side did not issue or already finished, credit overrun) fails every
pending request with a `ProtocolError` and marks the connection dirty; the next request first
resyncs on the same channel (sync token, then handshake), so nothing has to restart. An agent
that (re)starts on a long-lived channel says so (``error`` code ``reset``): pending requests
fail with `AgentUnavailable` and the next one resyncs. A request that times out is cancelled
on the agent (best effort) and raises `AgentTimeout`; frames that still arrive for it are
dropped; if it timed out with the agent stalled mid-frame, the channel is closed. End of
stream, a stalled frame, or any failure of the reader itself fails pending requests and
closes the connection (`closed`), so `AgentClient` opens a new channel for the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

from keel.agent import _protocol as p
from keel.agent._budget import CLIENT_BUDGET, Budget, Holding
from keel.agent._channel import Bytes, Channel
from keel.errors import (
    AgentBusy,
    AgentError,
    AgentTimeout,
    AgentUnavailable,
    BadArguments,
    CommandDenied,
    CommandFailed,
    FrameTooLarge,
    IntegrityError,
    ProtocolError,
    StreamLimitExceeded,
    UnknownCommand,
)

_ERRORS: dict[str, type[AgentError]] = {
    "protocol": ProtocolError,
    "too_large": FrameTooLarge,
    "denied": CommandDenied,
    "unknown": UnknownCommand,
    "invalid": BadArguments,
    "timeout": AgentTimeout,
    "failed": CommandFailed,
    "integrity": IntegrityError,
    "cancelled": AgentError,
    "busy": AgentBusy,
    "reset": AgentUnavailable,
}
_TOMBSTONES = 4096
DEFAULT_FRAME_TIMEOUT = 10.0


def error_from(frame: p.Error, command: str) -> AgentError:
    """The local exception for an agent's error frame (an unknown code is `CommandFailed`)."""
    cls = _ERRORS.get(frame.code, CommandFailed)
    fields = {k: v for k, v in frame.fields.items() if isinstance(k, str) and k.isidentifier()}
    fields.setdefault("command", command)
    fields.setdefault("code", frame.code)
    return cls(f"{command}: {frame.message}", **fields)


class _Request:
    """One request in flight: its chunks (bounded by the window) and its final frame."""

    def __init__(self, rid: int, command: str, window: int) -> None:
        self.id = rid
        self.command = command
        self.window = window
        self.chunks: deque[p.Data] = deque()
        self.unacked = 0  # chunks consumed since the last credit we granted
        self.outstanding = window  # chunks the agent may still send
        self.final: p.Result | p.Error | AgentError | None = None
        self.wake = asyncio.Event()
        self.send_credit = 0  # upload credit the agent granted us
        self.credit_wake = asyncio.Event()


class Connection:
    """One channel to one Keel agent. Use `AgentClient`, which wraps this."""

    def __init__(
        self,
        channel: Channel,
        *,
        client_name: str = "keel",
        max_frame: int = p.DEFAULT_MAX_FRAME,
        window: int = p.DEFAULT_WINDOW,
        sync_timeout: float = 6.0,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
        budget: Budget = CLIENT_BUDGET,
    ) -> None:
        self.channel = channel
        self.client_name = client_name
        self.max_frame = max_frame
        self.window = window
        self.sync_timeout = sync_timeout
        self.frame_timeout = frame_timeout
        self.welcome: p.Welcome | None = None
        self._decoder = p.FrameDecoder(max_frame)
        self._holding = Holding(budget)
        self._pending: dict[int, _Request] = {}
        self._tombstones: dict[int, None] = {}
        self._next_id = int.from_bytes(os.urandom(3), "big") + 1
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._ready = False
        self._closed: AgentError | None = None
        self._sync_nonce = 0
        self._synced = asyncio.Event()
        self._welcomed: asyncio.Future[p.Welcome] | None = None
        self._setup_lock = asyncio.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> p.Welcome:
        """Resync the stream and shake hands (also used after any protocol error)."""
        async with self._setup_lock:
            if self._ready and self.welcome is not None:
                return self.welcome
            if self._closed is not None:
                raise self._closed
            if self._reader is None:
                self._reader = asyncio.create_task(self._read_loop(), name="keel-agent-reader")
            await self._resync()
            loop = asyncio.get_running_loop()
            self._welcomed = loop.create_future()
            hello = p.Hello(p.PROTOCOL_VERSIONS, self.client_name, self.max_frame)
            await self._write(p.encode(hello), time.monotonic() + self.sync_timeout)
            try:
                async with asyncio.timeout(self.sync_timeout):
                    welcome = await self._welcomed
            except TimeoutError:
                raise AgentTimeout(
                    "the agent did not answer the handshake", command="hello"
                ) from None
            if welcome.version not in p.PROTOCOL_VERSIONS:
                raise ProtocolError(f"the agent chose protocol version {welcome.version}")
            if welcome.max_frame < p.MIN_MAX_FRAME:
                raise ProtocolError(f"the agent's max_frame {welcome.max_frame} is too small")
            self.welcome = welcome
            self._ready = True
            return welcome

    async def _resync(self) -> None:
        self._sync_nonce = int.from_bytes(os.urandom(8), "big")
        self._synced.clear()
        deadline = time.monotonic() + self.sync_timeout
        # Re-send the token: the agent drops a partial frame after its frame timeout, and a
        # token that landed inside that frame was lost with it.
        while True:
            await self._write(p.sync_token(self._sync_nonce), deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, remaining)):
                    await self._synced.wait()
                    return
            if self._closed is not None:
                raise self._closed
        raise AgentTimeout(f"no sync answer from the agent in {self.sync_timeout}s", command="sync")

    async def close(self) -> None:
        self._fail_all(AgentUnavailable("the connection to the agent was closed"), fatal=True)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])  # never raises; our own cancel still does
        await self.channel.close()

    @property
    def send_limit(self) -> int:
        """The largest frame this side may send: the smaller of both sides' maximums."""
        theirs = self.welcome.max_frame if self.welcome is not None else self.max_frame
        return min(self.max_frame, theirs)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    # --- writing --------------------------------------------------------------------------

    async def _write(self, data: Bytes, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        when = None if deadline is None else loop.time() + max(deadline - time.monotonic(), 0)
        try:
            if self._write_lock.locked():
                async with asyncio.timeout_at(when):
                    await self._write_lock.acquire()
            else:
                await self._write_lock.acquire()  # free: returns at once
        except TimeoutError:
            # Nothing of ours is on the wire: only this request misses its deadline.
            raise AgentTimeout(
                "the channel stayed busy past the deadline", command="write"
            ) from None
        try:
            async with asyncio.timeout_at(when):
                await self.channel.write(data)
        except AgentUnavailable as exc:
            self._fail_all(exc, fatal=True)
            raise
        except TimeoutError:
            # A frame may be half written: this stream cannot be trusted any more.
            err = AgentTimeout("the agent stopped reading; channel closed", command="write")
            self._fail_all(err, fatal=True)
            await self.channel.close()
            raise err from None
        finally:
            self._write_lock.release()

    # --- reading --------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            await self._read_frames()
        except AgentError as exc:
            self._fail_all(exc, fatal=True)
        except Exception as exc:
            # Whatever broke the reader (a bug of ours, a decoder failure nobody foresaw),
            # this stream cannot be trusted any more: close it so the next call opens a new
            # channel, rather than leave every later call to time out on a dead reader.
            self._fail_all(
                ProtocolError(f"the agent connection failed and was closed: {exc!r}"), fatal=True
            )
        finally:
            self._holding.release()
        await self.channel.close()

    async def _read_frames(self) -> None:
        started: float | None = None  # when the frame now arriving began
        while True:
            deadline = None if started is None else started + self.frame_timeout
            if self._holding.must_wait() and not await self._holding.room(deadline):
                raise self._stalled()
            if self._decoder.mid_frame and deadline is not None:
                try:
                    async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
                        data = await self._read_some()
                except TimeoutError:
                    raise self._stalled() from None
            else:
                data = await self._read_some()
            events = self._decoder.feed(data)
            self._holding.set(self._decoder.buffered)
            if not self._decoder.mid_frame:
                started = None
            elif started is None or events:
                started = time.monotonic()
            try:
                for event in events:
                    self._on_event(event)
            except AgentUnavailable:
                raise
            except AgentError as exc:
                # Keep reading so a later resync finds its answer on this same stream.
                self._fail_all(exc, fatal=False)
                self._synced.clear()
                self._decoder.hunt()
                self._holding.set(0)

    def _stalled(self) -> AgentTimeout:
        return AgentTimeout(
            f"the agent stalled mid-frame for {self.frame_timeout}s; channel closed",
            command="read",
            timeout=self.frame_timeout,
        )

    async def _read_some(self) -> bytes | bytearray:
        data = await self.channel.read(p.CHUNK)
        if not data:
            raise AgentUnavailable("the agent closed the channel")
        return data

    def _on_event(self, event: p.Event) -> None:
        if isinstance(event, p.Frame):
            if not self._synced.is_set():
                return  # leftovers of an earlier session, before our sync answer
            self._on_message(p.decode(event.payload))
        elif isinstance(event, p.Sync):
            if event.ack and event.nonce == self._sync_nonce:
                self._synced.set()
        else:
            raise event.error

    def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Welcome):
            if self._welcomed is None or self._welcomed.done():
                raise ProtocolError("unexpected welcome from the agent")
            self._welcomed.set_result(msg)
            return
        if isinstance(msg, p.Error) and msg.id == 0:
            # The agent saw garbage from us (or a stale half frame) and now hunts for a sync.
            self._ready = False
            self._fail_all(error_from(msg, "connection"), fatal=False)
            return
        if not isinstance(msg, p.Data | p.Result | p.Error | p.Credit):
            raise ProtocolError(f"the agent sent a {type(msg).__name__} frame")
        req = self._pending.get(msg.id)
        if req is None:
            if msg.id in self._tombstones:
                if not isinstance(msg, p.Data | p.Credit):
                    del self._tombstones[msg.id]
                return
            raise ProtocolError(
                f"the agent sent a {type(msg).__name__} for request {msg.id}, "
                "which is not in flight (unknown or repeated id)",
                request_id=msg.id,
            )
        if isinstance(msg, p.Data):
            if req.outstanding <= 0:
                raise StreamLimitExceeded(
                    f"{req.command}: the agent sent past its flow-control window",
                    limit=req.window,
                )
            req.outstanding -= 1
            req.chunks.append(msg)
        elif isinstance(msg, p.Credit):
            if msg.n <= 0 or msg.n > 1024:
                raise ProtocolError(f"the agent granted a credit of {msg.n}")
            req.send_credit += msg.n
            req.credit_wake.set()
            return
        else:
            req.final = msg
            del self._pending[msg.id]
            req.credit_wake.set()  # an upload waiting for credit learns the command ended
        req.wake.set()

    def _fail_all(self, exc: AgentError, *, fatal: bool) -> None:
        if fatal and self._closed is None:
            self._closed = exc
        self._ready = False
        for req in self._pending.values():
            self._tombstone(req.id)  # the agent may still answer it; that is not an error
            req.final = exc
            req.wake.set()
            req.credit_wake.set()
        self._pending.clear()
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_exception(exc)
            self._welcomed.exception()  # mark retrieved: start() may have given up already

    # --- requests -------------------------------------------------------------------------

    def _limit(self, timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    async def request(
        self, plugin: str, command: str, args: dict[str, Any], timeout: float | None
    ) -> Stream:
        """Send a call; the returned `Stream` yields its chunks and then its result."""
        if not self._ready:
            await self.start()
        rid = self._next_id
        self._next_id += 1
        name = f"{plugin}.{command}"
        req = _Request(rid, name, self.window)
        self._pending[rid] = req
        deadline = self._limit(timeout)
        call = p.Call(rid, plugin, command, args, timeout, self.window)
        try:
            await self._write(p.encode_checked(call, self.send_limit), deadline)
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return Stream(self, req, deadline, timeout)

    async def call(
        self, plugin: str, command: str, args: dict[str, Any], timeout: float | None
    ) -> Any:
        stream = await self.request(plugin, command, args, timeout)
        value = await stream.result()
        if stream._req.chunks:
            raise ProtocolError(f"{plugin}.{command}: the agent streamed to a plain call")
        return value

    def _tombstone(self, rid: int) -> None:
        self._tombstones[rid] = None
        while len(self._tombstones) > _TOMBSTONES:
            del self._tombstones[next(iter(self._tombstones))]

    def _abandon(self, req: _Request) -> None:
        if self._pending.pop(req.id, None) is not None:
            self._tombstone(req.id)
            if self._closed is None and self._ready:
                # Best effort: the agent stops the command; its final frame is then dropped.
                task = asyncio.get_running_loop().create_task(
                    self._write(p.encode(p.Cancel(req.id)), time.monotonic() + 1.0)
                )
                task.add_done_callback(_quiet)


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class Stream:
    """The chunks and result of one request, consumed by one task."""

    def __init__(
        self, conn: Connection, req: _Request, deadline: float | None, timeout: float | None
    ) -> None:
        self._conn = conn
        self._req = req
        self._deadline = deadline
        self._timeout = timeout

    @property
    def id(self) -> int:
        return self._req.id

    async def _wait(self, event: asyncio.Event) -> None:
        remaining = None if self._deadline is None else self._deadline - time.monotonic()
        try:
            async with asyncio.timeout(remaining):
                await event.wait()
        except TimeoutError:
            self._conn._abandon(self._req)
            conn = self._conn
            stalled = conn._decoder.mid_frame
            err = AgentTimeout(
                f"{self._req.command}: no answer within {self._timeout}s"
                + (" (the agent stalled mid-frame; channel closed)" if stalled else ""),
                command=self._req.command,
                timeout=self._timeout,
            )
            if stalled:
                # The stream is wedged inside a frame that may never end: the next call
                # opens a new channel instead of queueing behind it.
                conn._fail_all(err, fatal=True)
                await conn.channel.close()
            raise err from None
        except asyncio.CancelledError:
            self._conn._abandon(self._req)
            raise

    async def chunks(self) -> AsyncIterator[p.Data]:
        """The streamed chunks, in order; credit goes back as each is consumed."""
        req = self._req
        while True:
            if isinstance(req.final, AgentError):
                raise req.final  # the connection broke: what is queued cannot be trusted
            while req.chunks:
                chunk = req.chunks.popleft()
                req.unacked += 1
                if req.unacked * 2 >= req.window and req.final is None:
                    grant, req.unacked = req.unacked, 0
                    req.outstanding += grant
                    await self._conn._write(p.encode(p.Credit(req.id, grant)), self._deadline)
                yield chunk
            if req.final is not None:
                return
            req.wake.clear()
            if req.chunks or req.final is not None:
                continue
            await self._wait(req.wake)

    async def result(self) -> Any:
        req = self._req
        while req.final is None:
            req.wake.clear()
            if req.final is None:
                await self._wait(req.wake)
        final = req.final
        if isinstance(final, AgentError):
            raise final
        if isinstance(final, p.Error):
            raise error_from(final, req.command)
        return final.value

    async def send(self, data: Bytes, *, end: bool = False) -> None:
        """Upload one chunk, waiting for the agent's credit (flow control both ways)."""
        req = self._req
        while req.send_credit <= 0:
            if req.final is not None:
                await self.result()  # raises the agent's error, if any
                raise ProtocolError(f"{req.command}: the agent finished before the upload")
            req.credit_wake.clear()
            if req.send_credit <= 0:
                await self._wait(req.credit_wake)
        req.send_credit -= 1
        # msgspec encodes any buffer as msgpack bin: a memoryview slice of the caller's data
        # goes into the frame without an extra copy.
        chunk = p.Data(req.id, cast(bytes, data), end=end)
        frame = p.encode_checked(chunk, self._conn.send_limit)
        await self._conn._write(frame, self._deadline)

    def abandon(self) -> None:
        self._conn._abandon(self._req)
