"""Attacks on the Redis pipes (the coordination backend's `_redis_pipe.Pipe` and the messaging
transport's packer): a real server, and fake servers on 127.0.0.1 for the replies a real one
never sends."""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from yarl import URL

import servers
from keel.coordination.backends._redis_pipe import Pipe
from keel.errors import BackendUnavailable

pytestmark = pytest.mark.timeout(60)


def _pipe(url: str, db: int, *, login: tuple[str, str] | None = None, **kw: Any) -> Pipe:
    u = URL(url)
    return Pipe(
        u.host or "127.0.0.1",
        u.port or 6379,
        username=login[0] if login else None,
        password=login[1] if login else None,
        db=db,
        timeout=kw.pop("timeout", 5.0),
        **kw,
    )


async def test_commands_during_the_handshake_go_to_the_selected_db() -> None:
    """A command issued while a new connection waited for its AUTH reply went out before the
    SELECT: into db 0, so a lock held in db 9 was also free in db 0."""
    url = servers.server_url("redis")
    admin = aioredis.Redis.from_url(url.rsplit("/", 1)[0] + "/0")
    await admin.delete(*[f"keel-attack-db:{i}" for i in range(40)])
    await admin.execute_command("ACL", "SETUSER", "keel-attack", "on", ">pw", "~*", "&*", "+@all")
    pipe = _pipe(url, 9, login=("keel-attack", "pw"))
    try:
        calls = []
        for i in range(40):  # started one loop turn apart, across the handshake
            calls.append(asyncio.create_task(pipe.call("SET", f"keel-attack-db:{i}", "x")))
            await asyncio.sleep(0)
        await asyncio.gather(*calls)
        in_db0 = await admin.exists(*[f"keel-attack-db:{i}" for i in range(40)])
        assert in_db0 == 0, f"{in_db0} of 40 writes went to db 0"
    finally:
        await pipe.close()
        other = aioredis.Redis.from_url(url.rsplit("/", 1)[0] + "/9")
        await other.delete(*[f"keel-attack-db:{i}" for i in range(40)])
        await admin.delete(*[f"keel-attack-db:{i}" for i in range(40)])
        await admin.execute_command("ACL", "DELUSER", "keel-attack")
        await other.aclose()
        await admin.aclose()


class _Fake:
    """A fake Redis on 127.0.0.1: ``script`` maps the Nth command received (0-based) to the
    bytes answered for it; ``None`` hangs up; a missing entry answers nothing."""

    def __init__(self, script: dict[int, bytes | None]) -> None:
        self.script = script
        self.received = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while parser.gets() is not False:
                    n, self.received = self.received, self.received + 1
                    if n not in self.script:
                        continue
                    answer = self.script[n]
                    if answer is None:
                        writer.close()
                        return
                    writer.write(answer)
                    await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def _rss_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize(
    "header",
    [b"$536870912\r\nabc", b"*2000000000\r\n:1\r\n", b"%1000000000\r\n:1\r\n", b"~999999999\r\n"],
)
async def test_announced_sizes_are_not_allocated(header: bytes) -> None:
    """A reply whose header announces 512 MB (or two billion elements) and never comes: the
    call times out as BackendUnavailable, and nothing the header announced was allocated."""
    before = _rss_mb()
    async with _Fake({0: header}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 0, timeout=0.5)
        try:
            with pytest.raises(BackendUnavailable, match="did not answer"):
                await pipe.call("GET", "k")
        finally:
            await pipe.close()
    assert _rss_mb() - before < 64


@pytest.mark.parametrize("reply", [b"*-2\r\n", b"$-7\r\n", b":1x\r\n", b"!x\r\n", b"\x00\r\n"])
async def test_malformed_reply_is_backend_unavailable(reply: bytes) -> None:
    async with _Fake({0: reply, 1: b"+PONG\r\n"}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 0, timeout=2.0)
        try:
            with pytest.raises(BackendUnavailable):
                await pipe.call("GET", "k")
        finally:
            await pipe.close()


async def test_reply_lost_mid_pipeline() -> None:
    """Three commands in flight, the server answers the first and hangs up: the first has
    its reply, the other two a typed BackendUnavailable, and the next call reconnects."""
    async with _Fake({0: b"+ONE\r\n", 1: None, 2: b"+AGAIN\r\n", 3: b"+AGAIN\r\n"}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 0, timeout=2.0)
        try:
            got = await asyncio.gather(
                pipe.call("A"), pipe.call("B"), pipe.call("C"), return_exceptions=True
            )
            assert got[0] == b"ONE"
            assert all(isinstance(g, BackendUnavailable) for g in got[1:]), got
            assert await pipe.call("D") == b"AGAIN"  # on a fresh connection
        finally:
            await pipe.close()


@pytest.mark.parametrize(
    "wait_reply",
    [
        None,
        b"-READONLY You can't write against a read only replica.\r\n",
        b"+OK\r\n",  # not a count: a proxy, or not Redis; was a ValueError out of int()
        b"$3\r\nabc\r\n",
    ],
)
async def test_wait_lost_or_refused_is_backend_unavailable(wait_reply: bytes | None) -> None:
    """The write's reply came, the WAIT's did not (hang-up), was an error or not a count: the
    caller sees the retryable BackendUnavailable."""
    async with _Fake({0: b"+OK\r\n", 1: wait_reply}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 0, timeout=2.0, wait_replicas=1)
        try:
            with pytest.raises(BackendUnavailable):
                await pipe.call_replicated("SET", "k", "v")
        finally:
            await pipe.close()


@pytest.mark.parametrize(
    "value", [b"", b"\x00\r\n$3\r\n*1\r\n", "é\u2028\U0001f600", b"\xff" * 70000, 10**30, -1]
)
async def test_odd_values_round_trip(value: Any) -> None:
    url = servers.server_url("redis")
    pipe = _pipe(url, 0)
    try:
        await pipe.call("SET", "keel-attack-odd", value)
        got = await pipe.call("GET", "keel-attack-odd")
        expect = value if isinstance(value, bytes) else str(value).encode()
        assert got == expect
        await pipe.call("DEL", "keel-attack-odd")
    finally:
        await pipe.close()


async def test_close_during_the_handshake() -> None:
    """A server that never answers AUTH: closing the pipe ends the connection being opened
    (the caller gets BackendUnavailable at once), not after the timeout."""
    async with _Fake({}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 3, login=("u", "pw"), timeout=20.0)
        call = asyncio.create_task(pipe.call("GET", "k"))
        await asyncio.sleep(0.3)
        await asyncio.wait_for(pipe.close(), 2)
        with pytest.raises(BackendUnavailable, match="hung up"):
            await asyncio.wait_for(call, 2)


async def test_an_unsolicited_reply_drops_the_connection() -> None:
    """A reply nobody asked for (a confused or hostile server): the pipe hangs up on it
    and the next call gets its own answer on a fresh connection, never the stray one."""
    async with _Fake({0: b"+A\r\n+STRAY\r\n", 1: b"+B\r\n", 2: b"+B\r\n"}) as port:
        pipe = _pipe(f"redis://127.0.0.1:{port}", 0, timeout=2.0)
        try:
            assert await pipe.call("X") == b"A"
            await asyncio.sleep(0.2)
            try:
                got = await pipe.call("Y")
            except BackendUnavailable:  # sent before the hang-up was seen
                got = await pipe.call("Y")
            assert got == b"B"
        finally:
            await pipe.close()
