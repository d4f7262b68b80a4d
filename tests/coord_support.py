"""The one coordination-backend fixture, a TCP proxy that can cut connections, and helpers
shared by the coordination conformance and fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import keel.coordination
import servers
from keel.coordination import Coordinator

BACKENDS = ["sqlite", "etcd", "zookeeper", "redis"]
TTL = 2.0  # short leases keep expiry tests quick; etcd's floor is 2 s
WORKER = Path(__file__).resolve().parent / "coord_worker.py"


class CutProxy:
    """Forwards 127.0.0.1:port to a server on a thread of its own; ``cut()`` drops every
    connection open through it (clients must reconnect), as a partition would."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()
        self._thread.start()
        self._started.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, sock=self._sock))
        self._started.set()
        self._loop.run_forever()
        server.close()
        for w in list(self._writers):
            w.transport.abort()
        tasks = asyncio.all_tasks(self._loop)
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        def _cut() -> None:
            for w in list(self._writers):
                transport = w.transport
                transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(_cut)

    def close(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class BackendUnderTest:
    """One backend for the conformance suite: its URL, and its server's faults."""

    kind: str
    url: str
    server: str | None
    tmp: Path
    ns: str = field(default_factory=lambda: secrets.token_hex(4))
    _coords: list[Coordinator] = field(default_factory=list)
    _proxy: CutProxy | None = None

    def n(self, name: str) -> str:
        """A name unique to this test (servers are shared by the whole session)."""
        return f"{self.ns}-{name}"

    async def connect(self, member_id: str | None = None, *, ttl: float = TTL) -> Coordinator:
        coord = await keel.coordination.connect(self.url, member_id=member_id, ttl=ttl)
        self._coords.append(coord)
        return coord

    def proxied_url(self) -> str:
        """The URL through a proxy whose ``cut()`` drops connections (same URL for SQLite,
        which has no connection to cut)."""
        if self.server is None:
            return self.url
        if self._proxy is None:
            parts = urlsplit(self.url)
            assert parts.hostname
            assert parts.port
            self._proxy = CutProxy(parts.hostname, parts.port)
        return self.url.replace(f":{urlsplit(self.url).port}", f":{self._proxy.port}", 1)

    def cut(self) -> None:
        if self._proxy is not None:
            self._proxy.cut()

    def restart(self) -> None:
        """Restart the server (same data); SQLite has none and is unaffected."""
        if self.server is not None:
            servers.restart(self.server)

    def unreachable_url(self) -> str:
        if self.server is None:
            blocker = self.tmp / "not-a-directory"
            blocker.write_text("")
            return f"sqlite://{blocker}/coord.db"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return self.url.replace(f":{urlsplit(self.url).port}", f":{port}", 1)

    async def aclose(self) -> None:
        for coord in self._coords:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coord.close(), 10)
        if self._proxy is not None:
            self._proxy.close()


@pytest.fixture(name="backend", params=BACKENDS)
async def backend_fixture(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BackendUnderTest]:
    kind: str = request.param
    if kind == "sqlite":
        b = BackendUnderTest(kind, f"sqlite://{tmp_path}/coord.db", None, tmp_path)
    else:
        b = BackendUnderTest(kind, servers.server_url(kind), kind, tmp_path)
    try:
        yield b
    finally:
        await b.aclose()
