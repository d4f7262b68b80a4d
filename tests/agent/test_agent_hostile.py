"""The guest is untrusted: AgentClient against hostile agents (a real socket peer that breaks
the protocol on purpose) stays in bounded memory and time and reports each case as a typed
error. And the real agent against hostile bytes (hypothesis): it never dies and always
resyncs on the same stream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
from agent_helpers import AgentProcess
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from keel.agent import AgentClient
from keel.agent import _protocol as p
from keel.agent._channel import open_unix
from keel.agent._session import Connection
from keel.errors import (
    AgentError,
    AgentTimeout,
    FrameTooLarge,
    ProtocolError,
    StreamLimitExceeded,
)

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter, p.Call], Awaitable[None]]


async def read_message(reader: asyncio.StreamReader, decoder: p.FrameDecoder) -> p.Event:
    """The next event; events that arrived together wait in the decoder's ``pending``."""
    pending: list[p.Event] = decoder.__dict__.setdefault("pending", [])
    while not pending:
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("client went away")
        pending.extend(decoder.feed(data))
    return pending.pop(0)


@asynccontextmanager
async def hostile(
    tmp_path: Path, behaviour: Behaviour, handshake: bool = True
) -> AsyncIterator[str]:
    """A fake agent that shakes hands properly, then answers each call with ``behaviour``."""
    sock = str(tmp_path / "hostile.sock")
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = p.FrameDecoder()
        decoder.hunt()
        try:
            sync = await read_message(reader, decoder)
            assert isinstance(sync, p.Sync)
            if not handshake:
                await behaviour(reader, writer, p.Call(0, "", ""))
                return
            writer.write(p.ack_token(sync.nonce))
            for _ in range(40):
                event = await read_message(reader, decoder)
                if isinstance(event, p.Sync):  # the client resyncs after our mischief
                    writer.write(p.ack_token(event.nonce))
                elif isinstance(event, p.Frame):
                    msg = p.decode(event.payload)
                    if isinstance(msg, p.Hello):
                        welcome = p.Welcome(1, "evil", "i-evil", {}, p.DEFAULT_MAX_FRAME, 8)
                        writer.write(p.encode(welcome))
                    elif isinstance(msg, p.Call):
                        await behaviour(reader, writer, msg)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.create_task(serve(reader, writer)))

    server = await asyncio.start_unix_server(accepted, sock)
    try:
        yield f"unix://{sock}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_oversize_frame(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        w.write(p.HEADER.pack(p.MAGIC, 2**31) + b"\0" * 1000)

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=5) as c:
        with pytest.raises(FrameTooLarge) as info:
            await c.ping()
        assert info.value.size == 2**31


async def test_garbage(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        w.write(b"HTTP/1.1 200 OK\r\n\r\n" + os.urandom(500))

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=5) as c:
        with pytest.raises(ProtocolError, match="garbage"):
            await c.ping()


async def test_unknown_id(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        w.write(p.encode(p.Result(call.id + 1000, {})))

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=5) as c:
        with pytest.raises(ProtocolError, match="not in flight"):
            await c.ping()


async def test_repeated_id(tmp_path: Path) -> None:
    first: list[int] = []

    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        if not first:
            first.append(call.id)
            w.write(p.encode(p.Result(call.id, {})))
        else:
            w.write(p.encode(p.Result(first[0], {})))  # the first answer, again

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=5) as c:
        await c.ping()
        with pytest.raises(ProtocolError, match="unknown or repeated id"):
            await c.ping()


async def test_endless_stream_within_credit(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        decoder = p.FrameDecoder()
        credit = call.window
        for _ in range(10_000):  # "endless", but every loop here stops by itself
            while credit == 0:
                event = await read_message(r, decoder)
                if isinstance(event, p.Frame):
                    msg = p.decode(event.payload)
                    if isinstance(msg, p.Credit):
                        credit += msg.n
                    elif isinstance(msg, p.Cancel):
                        return
            w.write(p.encode(p.Data(call.id, b"y" * 65536)))
            credit -= 1
            await w.drain()

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=20) as c:
        with pytest.raises(StreamLimitExceeded):
            await c.exec(["yes"], max_output=8 * 1024 * 1024)


async def test_stream_past_its_credit(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        for _ in range(call.window + 5):
            w.write(p.encode(p.Data(call.id, b"z" * 1024)))

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=5) as c:
        conn = c._keel().conn
        stream = await conn.request("exec", "run", {"argv": ["x"]}, 5)
        await asyncio.sleep(0.2)  # let the flood arrive before anything is consumed
        with pytest.raises(StreamLimitExceeded, match="window"):
            async for _ in stream.chunks():
                pass
        assert conn._decoder.buffered <= p.HEADER.size + p.DEFAULT_MAX_FRAME


async def test_peer_stops_writing_mid_frame(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        frame = p.encode(p.Result(call.id, "x" * 1000))
        w.write(frame[:500])
        await asyncio.sleep(3)

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=0.5) as c:
        started = time.monotonic()
        with pytest.raises(AgentTimeout, match="mid-frame"):
            await c.ping()
        assert time.monotonic() - started < 2


async def test_peer_stops_reading_mid_frame(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        w.write(p.encode(p.Result(call.id, {})))
        await asyncio.sleep(5)  # then reads nothing more while the client writes

    async with hostile(tmp_path, evil) as url, await AgentClient.connect(url, timeout=1) as c:
        await c.ping()
        conn = c._keel().conn
        started = time.monotonic()

        async def flood() -> None:
            for _ in range(10):  # fills the socket buffers within a frame or two
                await conn.call("exec", "run", {"argv": ["cat"], "stdin": b"s" * 3_000_000}, 1)

        with pytest.raises(AgentTimeout, match="stopped reading"):
            await flood()
        assert time.monotonic() - started < 3
        assert conn.closed


async def test_no_handshake_and_endless_garbage(tmp_path: Path) -> None:
    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        for _ in range(400):  # about two seconds of garbage, never a sync answer
            w.write(os.urandom(16384).replace(p.SYNC_PREFIX, b"......"))
            await w.drain()
            await asyncio.sleep(0.005)

    async with hostile(tmp_path, evil, handshake=False) as url:
        conn = Connection(await open_unix(url.removeprefix("unix://")), sync_timeout=1.0)
        started = time.monotonic()
        try:
            with pytest.raises(AgentTimeout, match="sync"):
                await conn.start()
            assert time.monotonic() - started < 3
            assert conn._decoder.buffered < len(p.SYNC_PREFIX)
        finally:
            await conn.close()


async def test_a_failed_reader_closes_the_connection_and_the_client_reconnects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, any exception but an AgentError killed the reader task silently: every later
    call timed out and the connection never said it was closed, so nothing reconnected."""

    async def fine(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        w.write(p.encode(p.Result(call.id, {})))

    async with hostile(tmp_path, fine) as url, await AgentClient.connect(url, timeout=3) as c:
        await c.ping()
        conn = c._keel().conn

        def broken(event: p.Event) -> None:
            raise RuntimeError("a bug in the reader")

        monkeypatch.setattr(conn, "_on_event", broken)
        with pytest.raises(ProtocolError, match="closed"):
            await c.ping()
        assert conn.closed
        monkeypatch.undo()
        await c.ping()  # on a new channel
        assert c._keel().conn is not conn


# --- the real agent against hostile bytes -----------------------------------------------------


def raw_resync(path: str, junk: bytes) -> bytes:
    """Send junk to the agent, then a sync token; return what came back up to the ack."""
    nonce = int.from_bytes(os.urandom(8), "big")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(junk)
        deadline = time.monotonic() + 10
        got = b""
        ack = p.ack_token(nonce)
        while ack not in got and time.monotonic() < deadline:
            s.sendall(p.sync_token(nonce))  # repeated: a token inside a half frame is lost
            s.settimeout(0.5)
            try:
                while ack not in got:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise AssertionError(f"agent closed the channel; got {got[:200]!r}")
                    got += chunk
            except TimeoutError:
                continue
        assert ack in got, "the agent did not resync"
        return got


msg_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.text(max_size=8),
    st.binary(max_size=64),
    st.lists(st.integers(-5, 2**40), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(-5, 5) | st.text(max_size=4), max_size=3),
)


def framed(payload: bytes) -> bytes:
    return p.HEADER.pack(p.MAGIC, len(payload)) + payload


junk = st.one_of(
    st.binary(max_size=3000),
    st.builds(
        lambda n, body: p.HEADER.pack(p.MAGIC, n) + body,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=200),
    ),
    st.builds(
        lambda payload: p.HEADER.pack(p.MAGIC, len(payload)) + payload,
        st.binary(max_size=300),
    ),
    st.builds(
        lambda tag, rest: framed(msgspec.msgpack.encode([tag, *rest])),
        st.sampled_from(["hello", "call", "data", "credit", "cancel", "result", "error", "x"]),
        st.lists(msg_values, max_size=7),
    ),
    st.builds(
        lambda cmd, args: p.encode(p.Call(1, "core", cmd, args)),
        st.sampled_from(["ping", "info", "nope"]),
        st.dictionaries(
            st.text(max_size=5), st.integers(-(2**63), 2**63) | st.text(max_size=5), max_size=3
        ),
    ),
)


@settings(
    max_examples=40,
    deadline=None,
    # Each example costs real time on a real process; report the first failure unshrunk.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.booleans(), st.lists(junk, min_size=1, max_size=4))
def test_agent_survives_hostile_bytes_and_resyncs(
    agent: AgentProcess, hello: bool, parts: list[bytes]
) -> None:
    # With a handshake first, the junk reaches command dispatch, not only the frame layer.
    start = p.sync_token(1) + p.encode(p.Hello((1,), "fuzz", p.DEFAULT_MAX_FRAME)) if hello else b""
    raw_resync(agent.url.removeprefix("unix://"), start + b"".join(parts))
    assert agent.alive()


async def test_agent_answers_garbage_with_an_error_and_keeps_serving(agent: AgentProcess) -> None:
    got = raw_resync(agent.url.removeprefix("unix://"), b"\x00garbage" * 10)
    decoder = p.FrameDecoder()
    errors = [p.decode(e.payload) for e in decoder.feed(got) if isinstance(e, p.Frame)]
    assert any(isinstance(m, p.Error) and m.id == 0 and m.code == "protocol" for m in errors)
    async with await AgentClient.connect(agent.url, timeout=5) as client:
        await client.ping()


@settings(
    max_examples=30,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(junk, min_size=1, max_size=4))
def test_client_against_random_answers(tmp_path: Path, parts: list[bytes]) -> None:
    """Whatever a hostile agent answers, the client raises a keel.errors.AgentError (or
    gets a value) within its deadline, never anything else."""

    async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter, call: p.Call) -> None:
        for part in parts:
            w.write(part.replace(b"\x01", call.id.to_bytes(1, "big")) if call.id < 256 else part)
        await w.drain()

    async def scenario() -> None:
        async with hostile(tmp_path, evil) as url:
            client = await AgentClient.connect(url, timeout=0.5)
            try:
                with contextlib.suppress(AgentError):
                    await client.exec(["x"], timeout=0.1, max_output=1 << 20)
                with contextlib.suppress(AgentError):
                    await client.get_file("/x", max_size=1 << 20)
                with contextlib.suppress(AgentError):
                    await client.info()
            finally:
                await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
