"""`AgentClient`: one async API for the controller, over every channel and both agents.

Failure semantics: every method has a deadline (the client's ``timeout`` unless given) and
raises a `keel.errors.AgentError` subclass, never a socket, ssl or msgspec exception. Memory
is bounded: exec output past ``max_output`` and files past ``max_size`` raise
`StreamLimitExceeded` (and the request is cancelled on the agent). A received file whose
sha256 differs from the one the agent computed raises `IntegrityError`. If the channel
breaks, the next call opens a new one (once) and resyncs; calls in flight at the break fail
with `AgentUnavailable` and are not repeated, since they may have run.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from keel.agent import _protocol as p
from keel.agent._channel import (
    Channel,
    listen_unix,
    listen_vsock,
    open_tls,
    open_unix,
    open_virtio,
    open_vsock,
    parse_address,
)
from keel.agent._qga import QgaBackend
from keel.agent._session import DEFAULT_FRAME_TIMEOUT, Connection
from keel.agent._types import Backend, ExecResult, FileInfo, OutputCallback, expect
from keel.errors import (
    AgentError,
    ConfigError,
    IntegrityError,
    StreamLimitExceeded,
)

Opener = Callable[[], Awaitable[Channel]]
DEFAULT_MAX_OUTPUT = 64 * 1024 * 1024
DEFAULT_MAX_SIZE = 1024 * 1024 * 1024
EXEC_GRACE = 2.0


async def listen_for_agents(
    url: str, on_agent: Callable[[AgentClient], Awaitable[None]], *, timeout: float = 30.0
) -> asyncio.Server:
    """Accept agents that dial in: ``vsock://any:PORT`` (the CID comes from accept(), which a
    guest cannot forge) or ``unix:///path``. ``on_agent`` gets a connected client per agent
    and the channel closes when it returns. A failed handshake is dropped, not raised."""
    addr = parse_address(url)

    async def accepted(channel: Channel) -> None:
        try:
            client = await AgentClient.from_channel(channel, timeout=timeout)
        except AgentError:
            await channel.close()
            return
        async with client:
            await on_agent(client)

    if addr.scheme == "vsock":
        cid = -1 if addr.host == "any" else int(addr.host)
        return await listen_vsock(addr.port, accepted, cid=cid)
    if addr.scheme == "unix":
        return await listen_unix(addr.path, accepted)
    raise ConfigError(f"{url}: agents dial in over vsock:// or unix:// only")


class _ExecReply(msgspec.Struct):
    exit_code: int | None
    signal: int | None = None
    timed_out: bool = False


class _FileReply(msgspec.Struct):
    path: str
    size: int
    sha256: str


class KeelBackend:
    """Keel's own agent over a `Connection`."""

    kind = "keel"

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def ping(self, timeout: float) -> None:
        await self.conn.call("core", "ping", {}, timeout)

    async def info(self, timeout: float) -> dict[str, Any]:
        return expect(await self.conn.call("core", "info", {}, timeout), dict[str, Any], "info")

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        timeout: float,
        on_output: OutputCallback | None,
        max_output: int,
    ) -> ExecResult:
        args: dict[str, Any] = {"argv": argv}
        if env is not None:
            args["env"] = env
        if cwd is not None:
            args["cwd"] = cwd
        if stdin is not None:
            args["stdin"] = stdin
        # The agent kills the program at ``timeout`` and reports it; the request's own
        # deadline is a little later so that report can arrive.
        args["timeout"] = timeout
        stream = await self.conn.request("exec", "run", args, timeout + EXEC_GRACE)
        out: list[bytes] = []
        err: list[bytes] = []
        total = 0
        async for chunk in stream.chunks():
            total += len(chunk.data)
            if total > max_output:
                stream.abandon()
                raise StreamLimitExceeded(
                    f"exec {argv[0]}: output over {max_output} bytes", limit=max_output
                )
            if on_output is not None:
                on_output(chunk.stream, chunk.data)
            else:
                (err if chunk.stream else out).append(chunk.data)
        res = expect(await stream.result(), _ExecReply, "exec.run")
        return ExecResult(
            exit_code=res.exit_code,
            signal=res.signal,
            stdout=b"".join(out),
            stderr=b"".join(err),
            timed_out=res.timed_out,
        )

    async def put_file(
        self, path: str, data: bytes | Path, *, mode: int | None, timeout: float
    ) -> FileInfo:
        if isinstance(data, Path):
            digest = hashlib.sha256()
            size = 0
            with data.open("rb") as f:
                while block := f.read(p.CHUNK):
                    digest.update(block)
                    size += len(block)
        else:
            digest, size = hashlib.sha256(data), len(data)
        args: dict[str, Any] = {"path": path, "sha256": digest.hexdigest(), "size": size}
        if mode is not None:
            args["mode"] = mode
        stream = await self.conn.request("files", "put", args, timeout)
        chunk = min(p.CHUNK, self.conn.send_limit - 1024)
        if isinstance(data, Path):
            with data.open("rb") as f:
                while block := f.read(chunk):
                    await stream.send(block)
        else:
            view = memoryview(data)
            for start in range(0, len(data), chunk):
                await stream.send(view[start : start + chunk])
        await stream.send(b"", end=True)
        res = expect(await stream.result(), _FileReply, "files.put")
        return FileInfo(res.path, res.size, res.sha256)

    async def get_file(self, path: str, *, max_size: int, timeout: float) -> bytes:
        stream = await self.conn.request("files", "get", {"path": path}, timeout)
        parts: list[bytes] = []
        digest = hashlib.sha256()
        size = 0
        async for chunk in stream.chunks():
            size += len(chunk.data)
            if size > max_size:
                stream.abandon()
                raise StreamLimitExceeded(f"{path} is over {max_size} bytes", limit=max_size)
            digest.update(chunk.data)
            parts.append(chunk.data)
        res = expect(await stream.result(), _FileReply, "files.get")
        if res.sha256 != digest.hexdigest() or res.size != size:
            raise IntegrityError(
                f"{path}: received {size} bytes that do not match the agent's sha256",
                expected=res.sha256,
                actual=digest.hexdigest(),
            )
        return b"".join(parts)

    async def set_password(
        self, username: str, password: str, *, crypted: bool, timeout: float
    ) -> None:
        args = {"username": username, "password": password, "crypted": crypted}
        await self.conn.call("users", "set_password", args, timeout)

    async def add_ssh_key(self, username: str, key: str, *, timeout: float) -> None:
        await self.conn.call("users", "add_ssh_key", {"username": username, "key": key}, timeout)

    async def call(self, plugin: str, command: str, args: dict[str, Any], timeout: float) -> Any:
        return await self.conn.call(plugin, command, args, timeout)

    async def resync(self) -> None:
        self.conn._ready = False
        await self.conn.start()

    async def close(self) -> None:
        await self.conn.close()

    @property
    def closed(self) -> bool:
        return self.conn.closed


class AgentClient:
    """Talk to one guest's agent, Keel's or qemu-guest-agent, with one API.

    Open it with `AgentClient.connect` and a URL: ``unix:///path`` (virtio-serial's host
    socket or a plain unix socket), ``tls://host:port`` (give ``ssl_context`` and
    ``instance_id``), ``vsock://cid:port``, or ``qga+unix:///path`` for qemu-guest-agent.
    """

    def __init__(self, backend: Backend, opener: Opener | None, *, timeout: float) -> None:
        self._backend = backend
        self._opener = opener
        self._make: Callable[[Channel], Backend] | None = None  # set with the opener
        self.timeout = timeout

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        instance_id: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        client_name: str = "keel",
        max_frame: int = p.DEFAULT_MAX_FRAME,
        frame_timeout: float = DEFAULT_FRAME_TIMEOUT,
    ) -> AgentClient:
        """``frame_timeout``: a frame from the agent must be whole this long after its first
        byte, or the channel is closed (the next call opens a new one)."""
        addr = parse_address(url)
        opener: Opener
        if addr.scheme == "tls":
            if ssl_context is None or instance_id is None:
                raise ConfigError(
                    f"{url}: a TLS agent needs ssl_context (with the controller's client "
                    "certificate) and the instance_id its certificate must name"
                )
            ctx, iid = ssl_context, instance_id

            async def opener() -> Channel:
                return await open_tls(addr.host, addr.port, ctx, iid)

        elif addr.scheme == "vsock":

            async def opener() -> Channel:
                return await open_vsock(int(addr.host), addr.port)

        elif addr.scheme == "virtio":

            async def opener() -> Channel:
                return await open_virtio(addr.path)

        else:

            async def opener() -> Channel:
                return await open_unix(addr.path)

        def make(channel: Channel) -> Backend:
            if addr.scheme == "qga+unix":
                return QgaBackend(channel)
            conn = Connection(
                channel, client_name=client_name, max_frame=max_frame, frame_timeout=frame_timeout
            )
            return KeelBackend(conn)

        client = cls(make(await opener()), opener, timeout=timeout)
        client._make = make
        if isinstance(client._backend, KeelBackend):
            try:
                await client._backend.conn.start()
            except BaseException:
                await client.close()
                raise
        return client

    @classmethod
    async def from_channel(
        cls, channel: Channel, *, timeout: float = 30.0, client_name: str = "keel"
    ) -> AgentClient:
        """A client for an agent that dialed in (vsock, or a listening unix socket)."""
        client = cls(
            KeelBackend(Connection(channel, client_name=client_name)), None, timeout=timeout
        )
        try:
            await client._keel().conn.start()
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def peer(self) -> str:
        """Who is on the other end, as the channel knows it (e.g. ``vsock:cid=3``)."""
        backend = self._backend
        if isinstance(backend, KeelBackend):
            return backend.conn.channel.peer
        if isinstance(backend, QgaBackend):
            return backend.channel.peer
        return "?"

    def _keel(self) -> KeelBackend:
        assert isinstance(self._backend, KeelBackend)
        return self._backend

    @property
    def kind(self) -> str:
        """``keel`` or ``qga``."""
        return self._backend.kind

    @property
    def welcome(self) -> p.Welcome | None:
        """What a Keel agent said in its handshake (plugins, versions); None for qga."""
        return self._backend.conn.welcome if isinstance(self._backend, KeelBackend) else None

    async def _backend_ready(self) -> Backend:
        backend = self._backend
        if backend.closed and self._opener is not None and self._make is not None:
            await backend.close()
            self._backend = self._make(await self._opener())
        return self._backend

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    async def ping(self, *, timeout: float | None = None) -> None:
        await (await self._backend_ready()).ping(self._t(timeout))

    async def info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """OS, hostname, agent version and uptimes (``None`` where the agent cannot say)."""
        return await (await self._backend_ready()).info(self._t(timeout))

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> ExecResult:
        """Run a program in the guest; output streams to ``on_output`` as it comes (Keel's
        agent) or is collected into the result. At ``timeout`` the agent kills the program
        and the result says ``timed_out`` (qemu-ga cannot kill: `AgentTimeout` there)."""
        backend = await self._backend_ready()
        return await backend.exec(
            argv,
            env=env,
            cwd=cwd,
            stdin=stdin,
            timeout=self._t(timeout),
            on_output=on_output,
            max_output=max_output,
        )

    async def put_file(
        self,
        path: str,
        data: bytes | Path,
        *,
        mode: int | None = None,
        timeout: float | None = None,
    ) -> FileInfo:
        """Write ``data`` (bytes, or a local file streamed in chunks) to ``path`` in the guest."""
        backend = await self._backend_ready()
        return await backend.put_file(path, data, mode=mode, timeout=self._t(timeout))

    async def get_file(
        self, path: str, *, max_size: int = DEFAULT_MAX_SIZE, timeout: float | None = None
    ) -> bytes:
        backend = await self._backend_ready()
        return await backend.get_file(path, max_size=max_size, timeout=self._t(timeout))

    async def set_password(
        self, username: str, password: str, *, crypted: bool = False, timeout: float | None = None
    ) -> None:
        backend = await self._backend_ready()
        await backend.set_password(username, password, crypted=crypted, timeout=self._t(timeout))

    async def add_ssh_key(self, username: str, key: str, *, timeout: float | None = None) -> None:
        backend = await self._backend_ready()
        await backend.add_ssh_key(username, key, timeout=self._t(timeout))

    async def service(self, unit: str, action: str, *, timeout: float | None = None) -> Any:
        """``status``, ``start``, ``stop`` or ``restart`` a systemd unit (Keel's agent only)."""
        if action not in ("status", "start", "stop", "restart"):
            raise ConfigError(f"service action {action!r}: use status, start, stop or restart")
        return await self.call("services", action, timeout=timeout, unit=unit)

    async def health(self, *, timeout: float | None = None) -> Any:
        """Load, memory and disk (Keel's agent only)."""
        return await self.call("health", "report", timeout=timeout)

    async def call(
        self, plugin: str, command: str, *, timeout: float | None = None, **args: Any
    ) -> Any:
        """Any plugin command by name (``qga`` as plugin passes a raw qga command)."""
        backend = await self._backend_ready()
        return await backend.call(plugin, command, args, self._t(timeout))

    async def resync(self) -> None:
        """Get back to a clean stream on the same channel (no restart on either side)."""
        await (await self._backend_ready()).resync()

    async def close(self) -> None:
        await self._backend.close()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
