"""The one coordination-backend fixture, a TCP proxy that can cut connections, and helpers
shared by the coordination conformance and fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import keel.coordination
import servers
from keel.coordination import Coordinator

BACKENDS = ["sqlite", "etcd", "zookeeper", "redis"]
TTL = 2.0  # short leases keep expiry tests quick; etcd's floor is 2 s
# The contract's bound (docs/coordination-contract.md, "Liveness"): a lock whose holder died or
# whose server restarted is free again within its ttl plus this, on every backend.
FREE_BOUND = 3.0
WORKER = Path(__file__).resolve().parent / "coord_worker.py"


async def spawn_worker(*args: str) -> asyncio.subprocess.Process:
    """Start coord_worker.py with these arguments; it reports on its stdout, a line at a time."""
    return await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), *args, stdout=asyncio.subprocess.PIPE
    )


async def worker_line(proc: asyncio.subprocess.Process, within: float = 30) -> str:
    assert proc.stdout is not None
    return (await asyncio.wait_for(proc.stdout.readline(), within)).decode().strip()


async def reap_worker(proc: asyncio.subprocess.Process) -> None:
    """Wake, kill and wait for a worker, whether or not it is still running. asyncio's child
    watcher may have reaped an exited worker before its returncode is set, so signals to it may
    find no such process."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
            proc.kill()
    await proc.wait()


Heartbeat = Callable[[bytes], bool]


def _zookeeper_ping(chunk: bytes) -> bool:
    # kazoo's ping: length 8, xid -2, opcode 11 (PING); sent on its own whenever idle.
    return chunk == b"\x00\x00\x00\x08\xff\xff\xff\xfe\x00\x00\x00\x0b"


def _http2_control(chunk: bytes) -> bool:
    # gRPC (etcd) sends SETTINGS, PING and WINDOW_UPDATE frames on its own; a request has a
    # HEADERS or DATA frame.
    i = 0
    while i + 9 <= len(chunk):
        length = int.from_bytes(chunk[i : i + 3], "big")
        if chunk[i + 3] in (0, 1):
            return False
        i += 9 + length
    return True


HEARTBEATS: dict[str, Heartbeat] = {
    "zookeeper": _zookeeper_ping,
    "etcd": _http2_control,
    "redis": lambda chunk: False,
}


async def handed_over(
    held: keel.coordination.HeldLock,
    waiting: asyncio.Task[keel.coordination.HeldLock],
    timeout: float,
) -> int:
    """Release ``held`` (confirmed), and the waiting acquire gets the lock with a higher
    fence, which it releases too: that fence."""
    fence = held.fence
    await held.release_confirmed()
    got = await asyncio.wait_for(waiting, timeout)
    handed = got.fence  # read while held: a released lock's fence raises LockLost
    assert handed > fence
    await got.release_confirmed()
    return handed


class CutProxy:
    """Forwards 127.0.0.1:port to a server on a thread of its own. ``cut()`` drops every
    connection open through it (clients must reconnect), as a partition would;
    ``drop_next_request()`` swallows the next request and cuts its connection (the server never
    sees it); ``lose_next_reply()`` forwards the next request, swallows what the server answers
    and cuts (the write is applied, its reply lost). ``heartbeat`` tells the client library's
    own keep-alive traffic apart from requests."""

    def __init__(self, host: str, port: int, heartbeat: Heartbeat = lambda chunk: False) -> None:
        self._target = (host, port)
        self._heartbeat = heartbeat
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._armed: str | None = None
        self._stalled = False
        self.fired = threading.Event()
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
        muted = asyncio.Event()  # set: the server's answers are swallowed

        def abort() -> None:
            writer.transport.abort()
            up_writer.transport.abort()

        async def upstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await reader.read(65536):
                    mode = self._armed
                    if mode is not None and not self._heartbeat(data):
                        self._armed = None
                        if mode == "drop":
                            abort()
                            self.fired.set()
                            return
                        muted.set()
                        up_writer.write(data)
                        # Long enough for the server to apply it; then the connection dies.
                        self._loop.call_later(0.3, abort)
                        self._loop.call_later(0.3, self.fired.set)
                        continue
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        async def downstream() -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await up_reader.read(65536):
                    if muted.is_set() or self._stalled:
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(upstream(), downstream())
        self._writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        def _cut() -> None:
            for w in list(self._writers):
                transport = w.transport
                transport.abort()
            self._writers.clear()

        self._loop.call_soon_threadsafe(_cut)

    def _arm(self, mode: str) -> None:
        self.fired.clear()
        self._armed = mode

    def drop_next_request(self) -> None:
        self._arm("drop")

    def lose_next_reply(self) -> None:
        self._arm("lose")

    def disarm(self) -> None:
        self._armed = None

    def stall(self, stalled: bool = True) -> None:
        """Swallow every answer of the server while connections stay open (a server that
        stopped answering: SIGSTOP, a full disk, a half-open route)."""
        self._stalled = stalled

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

    async def connect(
        self, member_id: str | None = None, *, ttl: float = TTL, proxied: bool = False
    ) -> Coordinator:
        url = self.proxied_url() if proxied else self.url
        coord = await keel.coordination.connect(url, member_id=member_id, ttl=ttl)
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
            self._proxy = CutProxy(parts.hostname, parts.port, HEARTBEATS[self.kind])
        return self.url.replace(f":{urlsplit(self.url).port}", f":{self._proxy.port}", 1)

    def cut(self) -> None:
        if self._proxy is not None:
            self._proxy.cut()

    async def drop_next_request(self) -> None:
        """The next request through the proxy never reaches the server; its connection drops.
        (No-op on SQLite, which has no connection.)"""
        if self._proxy is not None:
            self._proxy.drop_next_request()

    async def lose_next_reply(self) -> None:
        """The next request through the proxy is applied; its reply is lost with the
        connection. (No-op on SQLite, which has no connection.)"""
        if self._proxy is not None:
            self._proxy.lose_next_reply()

    async def fault_fired(self, within: float = 10) -> None:
        """Wait until the armed fault has happened (at once on SQLite)."""
        if self._proxy is not None:
            fired = await asyncio.to_thread(self._proxy.fired.wait, within)
            assert fired, "the armed proxy fault never fired"

    @property
    def server_max_ttl(self) -> float:
        """The longest lease the server grants, whatever a client asks for (ZooKeeper caps
        session timeouts: maxSessionTimeout in scripts/servers.d/zookeeper.sh)."""
        return 60.0 if self.kind == "zookeeper" else float("inf")

    def restart(self) -> None:
        """Restart the server (same data); SQLite has none and is unaffected."""
        if self.server is not None:
            servers.restart(self.server)

    def stop(self) -> None:
        """Stop the server (same data) until `resume`; SQLite has none and is unaffected."""
        if self.server is not None:
            servers.stop(self.server)

    def resume(self) -> None:
        """Start the server `stop` stopped and wait until it is ready (not booked as started
        by this session: it stays up after it)."""
        if self.server is not None:
            servers.resume(self.server)

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
