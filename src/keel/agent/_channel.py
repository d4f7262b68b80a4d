"""Channels: the few I/O primitives (read, write, close) the agent protocol runs over.

virtio-serial (a character device in the guest, the hypervisor's unix socket on the host),
AF_VSOCK, TCP with mutual TLS, and plain unix sockets. Framing, deadlines, resync and flow
control are not here; they live once in `keel.agent._session`.

Failure semantics: every foreign exception (OSError, ssl.SSLError, asyncio stream errors) is
mapped to `keel.errors` in one helper, `map_errors`: a broken or refused channel is
`AgentUnavailable`; a kernel without the channel is `ChannelUnsupported`; a TLS peer whose
certificate names another instance is `AgentIdentityMismatch` (the channel is closed before
any frame is read). ``read`` returns ``b""`` at end of stream; ``write`` waits while the
peer's buffers are full (that is the back-pressure the session's deadlines bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import ssl
import stat
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

from keel.errors import (
    AgentIdentityMismatch,
    AgentUnavailable,
    ChannelUnsupported,
    ConfigError,
    KeelError,
)

_PAUSE_AT = 256 * 1024  # unread bytes at which a stream channel stops reading its socket

_RECV_BUF = 256 * 1024
_DEVICE_READ = 64 * 1024  # gathered from a device per read (sixteen virtio-serial buffers)
_PORT_BUFFER = 4096  # what one read() of a virtio-serial port returns at most
Bytes = bytes | bytearray | memoryview
VMADDR_CID_HOST = 2
_UNSUPPORTED = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENODEV, errno.EPROTONOSUPPORT}


class Channel(Protocol):
    """A byte stream to one peer. ``peer`` names who is on the other end, for audit lines;
    ``waited`` counts the reads that had to wait for the peer (each let the loop run others)."""

    peer: str
    waited: int

    async def read(self, max_bytes: int) -> bytes | bytearray: ...

    async def write(self, data: Bytes) -> None: ...

    async def close(self) -> None: ...


@contextlib.contextmanager
def map_errors(what: str) -> Iterator[None]:
    """Turn a foreign I/O exception into the `keel.errors` class a caller can act on."""
    try:
        yield
    except KeelError:
        raise
    except ssl.SSLCertVerificationError as exc:
        raise AgentUnavailable(f"{what}: TLS certificate refused: {exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise AgentUnavailable(f"{what}: TLS error: {exc.reason or exc}") from None
    except (asyncio.IncompleteReadError, EOFError):
        raise AgentUnavailable(f"{what}: the peer closed the channel") from None
    except OSError as exc:
        if exc.errno in _UNSUPPORTED and "vsock" in what:
            raise ChannelUnsupported(
                f"{what}: this kernel has no usable AF_VSOCK ({os.strerror(exc.errno or 0)}); "
                "load vhost_vsock/vsock_loopback or use the unix or TLS channel",
                channel="vsock",
            ) from None
        raise AgentUnavailable(f"{what}: {exc.strerror or exc}") from None


class StreamChannel(asyncio.BufferedProtocol):
    """A channel over an asyncio transport (unix, TCP+TLS, vsock).

    The transport receives into one reused buffer (a fresh ``bytes`` per recv would cost an
    mmap, mremap and munmap for every small message); a full buffer is handed over whole and
    replaced, so a bulk transfer is not copied again on its way to the frame decoder.
    Reading pauses while more than ``_PAUSE_AT`` bytes wait unread (what one connection may
    hold before the session reads it); writing waits while the transport is paused.
    """

    def __init__(self, peer: str = "?", on_open: Callable[[StreamChannel], None] | None = None):
        self.peer = peer
        self.waited = 0
        self._on_open = on_open
        self._loop = asyncio.get_running_loop()
        self._chunks: deque[bytes | bytearray] = deque()
        self._rbuf = bytearray(_RECV_BUF)
        self._queued = 0
        self._eof = False
        self._lost: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self.transport: asyncio.Transport | None = None

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A read-write transport; uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_open is not None:
            self._on_open(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._rbuf)

    def buffer_updated(self, nbytes: int) -> None:
        data: bytes | bytearray
        if nbytes == len(self._rbuf):
            data, self._rbuf = self._rbuf, bytearray(_RECV_BUF)
        else:
            data = self._rbuf[:nbytes]
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued >= _PAUSE_AT and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._lost = exc
        self._wake_reader()
        self._wake_writer()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # Channel

    async def read(self, max_bytes: int) -> bytes | bytearray:
        while not self._chunks:
            if self._eof:
                if self._lost is not None:
                    with map_errors(f"read from {self.peer}"):
                        raise self._lost
                return b""
            self.waited += 1
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        if len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._queued -= len(chunk)
        if self._reading_paused and self._queued <= _PAUSE_AT // 2 and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return chunk

    async def write(self, data: Bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._closed.done():
            raise AgentUnavailable(f"write to {self.peer}: the channel is closed")
        transport.write(data)
        while self._writing_paused and not self._closed.done():
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
        if self._closed.done() and self._lost is not None:
            with map_errors(f"write to {self.peer}"):
                raise self._lost

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        with contextlib.suppress(TimeoutError):
            # shield: our caller's cancellation must not cancel the shared close waiter
            async with asyncio.timeout(1.0):
                await asyncio.shield(self._closed)
        if not self._closed.done() and self.transport is not None:
            self.transport.abort()


class _DeviceChannel:
    """A character device (the guest end of virtio-serial), read and written without threads.

    Read as asyncio's own transports read a socket: the device stays registered with the
    event loop, and the loop's callback reads what arrived and hands it to the waiting
    reader. A small message costs one wake-up and one read(), with no epoll_ctl pair, no
    failed read and no stale readiness per message (in a guest under TCG every system call,
    Python exception and trip through the loop costs tens of microseconds). At most one
    gathered chunk waits unread: with one waiting, the device is unregistered until it is
    taken (back-pressure: the guest kernel's buffers fill and the host stops sending).

    With no host connected, a virtio-serial port reads as end of stream and polls as hung
    up, and writes would wait forever: a write that meets a hang-up is `AgentUnavailable`."""

    def __init__(self, path: str, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._rbuf = bytearray(_DEVICE_READ)
        self.peer = f"virtio:{path}"
        self.waited = 0
        self._loop = asyncio.get_running_loop()
        self._chunk: bytes | None = None  # read from the device, not yet taken
        self._failed: OSError | None = None
        self._watching = False
        self._waiter: asyncio.Future[None] | None = None

    def _readable(self) -> None:
        if self._chunk is not None:
            self._unwatch()  # the reader is behind: leave the rest in the device
            return
        try:
            self._chunk = self._drain(_DEVICE_READ)
        except OSError as exc:
            self._failed = exc
        if self._chunk is None and self._failed is None:
            return  # nothing after all
        if self._chunk == b"" or self._failed is not None:
            self._unwatch()  # end of stream or a broken device: nothing more to wait for
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self._loop.remove_reader(self._fd)

    async def read(self, max_bytes: int) -> bytes | bytearray:
        while True:
            if self._fd < 0:
                return b""
            chunk = self._chunk
            if chunk is not None:
                if len(chunk) > max_bytes:
                    self._chunk = chunk[max_bytes:]
                    return chunk[:max_bytes]
                self._chunk = None
                return chunk
            if self._failed is not None:
                with map_errors(f"read from {self.peer}"):
                    raise self._failed
            if not self._watching:
                # What arrived while nobody watched is there already: no trip through the loop.
                with map_errors(f"read from {self.peer}"):
                    data = self._drain(max_bytes)
                if data is not None:
                    return data
                self._watch()
            self.waited += 1
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _watch(self) -> None:
        with map_errors(f"read from {self.peer}"):
            self._loop.add_reader(self._fd, self._readable)
        self._watching = True

    def _drain(self, max_bytes: int) -> bytes | None:
        """What the device has now, up to ``max_bytes``; None if nothing yet. A virtio-serial
        port returns one of its 4 KiB buffers per read(), so a bulk transfer would otherwise
        cost a trip through the event loop per 4 KiB. Gathered in one reused buffer. A read
        shorter than a buffer and than asked ends the gathering: the device is most likely
        empty, and if not, the loop says so (this spares a failed read per small message)."""
        with memoryview(self._rbuf) as view:
            limit = min(max_bytes, len(view))
            got = 0
            while got < limit:
                try:
                    n = os.readv(self._fd, [view[got:limit]])
                except BlockingIOError:
                    break
                if not n:
                    if got:
                        break  # the end comes with the next read
                    return b""
                got += n
                if n < _PORT_BUFFER:
                    break
            return bytes(view[:got]) if got else None

    async def write(self, data: Bytes) -> None:
        view = memoryview(data)
        while view:
            if self._fd < 0:
                raise AgentUnavailable(f"write to {self.peer}: the channel is closed")
            try:  # the common case first, without map_errors' generator around it
                view = view[os.write(self._fd, view) :]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                with map_errors(f"write to {self.peer}"):
                    raise exc from None
            with map_errors(f"write to {self.peer}"):
                if self._hung_up():
                    raise AgentUnavailable(f"write to {self.peer}: no host on the other end")
            ready = self._loop.create_future()
            self._loop.add_writer(self._fd, ready.set_result, None)
            try:
                await ready
            finally:
                self._loop.remove_writer(self._fd)

    def _hung_up(self) -> bool:
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return any(ev & select.POLLHUP for _, ev in poller.poll(0))

    async def close(self) -> None:
        if self._fd >= 0:
            self._unwatch()
        fd, self._fd = self._fd, -1  # once: the number may belong to another file later
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)  # a pending read returns end of stream
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _unix_peer(transport: asyncio.BaseTransport) -> str:
    sock = transport.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
    except (OSError, AttributeError):
        return "unix:?"
    return f"unix:uid={uid},pid={pid}"


def cert_names(cert: dict[str, object] | None) -> list[str]:
    """The DNS and URI names in a peer certificate's subjectAltName."""
    names: list[str] = []
    for kind, value in cert.get("subjectAltName", ()) if cert else ():  # type: ignore[attr-defined]
        if kind in ("DNS", "URI"):
            names.append(str(value))
    return names


def check_identity(transport: asyncio.BaseTransport, expected: str | None) -> str:
    """The TLS peer's first name; raise `AgentIdentityMismatch` unless it names ``expected``."""
    names = cert_names(transport.get_extra_info("peercert"))
    if expected is not None and expected not in names and f"urn:keel:{expected}" not in names:
        raise AgentIdentityMismatch(
            f"the agent's certificate names {names or 'nothing'}, not instance {expected}; "
            "refusing to talk to it",
            expected=expected,
            presented=names,
        )
    return names[0] if names else "?"


# --- opening (controller side and agent dial-out) ---------------------------------------------


async def open_unix(path: str) -> Channel:
    loop = asyncio.get_running_loop()
    with map_errors(f"connect to unix:{path}"):
        _, channel = await loop.create_unix_connection(lambda: StreamChannel(f"unix:{path}"), path)
    return channel


async def open_tls(host: str, port: int, context: ssl.SSLContext, instance_id: str) -> Channel:
    """Connect with mutual TLS and refuse a peer whose certificate is not ``instance_id``'s."""
    loop = asyncio.get_running_loop()
    with map_errors(f"connect to tls:{host}:{port}"):
        transport, channel = await loop.create_connection(
            lambda: StreamChannel(f"tls:{host}:{port}"),
            host,
            port,
            ssl=context,
            server_hostname=instance_id,
        )
    try:
        name = check_identity(transport, instance_id)
    except AgentIdentityMismatch:
        await channel.close()
        raise
    channel.peer = f"tls:{name}@{host}:{port}"
    return channel


async def open_vsock(cid: int, port: int) -> Channel:
    loop = asyncio.get_running_loop()
    with map_errors(f"connect to vsock:{cid}:{port}"):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (cid, port))
            _, channel = await loop.create_connection(
                lambda: StreamChannel(f"vsock:{cid}:{port}"), sock=sock
            )
        except BaseException:
            sock.close()
            raise
    return channel


async def open_virtio(path: str) -> Channel:
    """The guest end of virtio-serial. A unix socket at ``path`` stands in for the device."""
    with map_errors(f"open virtio:{path}"):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return await open_unix(path)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    return _DeviceChannel(path, fd)


# --- listening ------------------------------------------------------------------------------

Handler = Callable[[Channel], Awaitable[None]]


class _Acceptor:
    """Makes a `StreamChannel` per accepted connection and runs the handler on it."""

    def __init__(self, handler: Handler, name: Callable[[asyncio.BaseTransport], str]) -> None:
        self.handler = handler
        self.name = name
        self.tasks: set[asyncio.Task[None]] = set()

    def __call__(self) -> StreamChannel:
        return StreamChannel(on_open=self._opened)

    def _opened(self, channel: StreamChannel) -> None:
        assert channel.transport is not None
        channel.peer = self.name(channel.transport)
        task = asyncio.get_running_loop().create_task(self._run(channel))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, channel: StreamChannel) -> None:
        try:
            await self.handler(channel)
        finally:
            await channel.close()


async def listen_unix(path: str, handler: Handler) -> asyncio.Server:
    """Listen on ``path``. The socket file appears only once it accepts connections: it is
    bound under a temporary name, listening, then renamed into place, so whoever waits for
    the file (a test, a hypervisor) never meets a bound socket that refuses."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    loop = asyncio.get_running_loop()
    staging = f"{path}.{os.getpid()}.tmp"
    with map_errors(f"listen on unix:{path}"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            sock.bind(staging)
            sock.listen(100)
            os.rename(staging, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        return await loop.create_unix_server(_Acceptor(handler, _unix_peer), sock=sock)


async def listen_tls(
    host: str, port: int, context: ssl.SSLContext, handler: Handler
) -> asyncio.Server:
    def name(transport: asyncio.BaseTransport) -> str:
        return f"tls:{check_identity(transport, None)}"

    loop = asyncio.get_running_loop()
    with map_errors(f"listen on tls:{host}:{port}"):
        return await loop.create_server(
            _Acceptor(handler, name), host, port, ssl=context, reuse_address=True
        )


async def listen_vsock(port: int, handler: Handler, cid: int = -1) -> asyncio.Server:
    """Host side: accept agents dialing in. The CID comes from ``accept()``, which the guest
    cannot forge; ``cid`` -1 is VMADDR_CID_ANY."""

    def name(transport: asyncio.BaseTransport) -> str:
        peer_cid, _ = transport.get_extra_info("peername")
        return f"vsock:cid={peer_cid}"

    loop = asyncio.get_running_loop()
    with map_errors(f"listen on vsock:{cid}:{port}"):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((cid & 0xFFFFFFFF, port))
            sock.listen(16)
            sock.setblocking(False)
            return await loop.create_server(_Acceptor(handler, name), sock=sock)
        except BaseException:
            sock.close()
            raise


# --- addresses ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A parsed channel URL: ``unix:///p``, ``qga+unix:///p``, ``tls://host:port``,
    ``vsock://cid:port``, ``virtio:///dev/virtio-ports/NAME``."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0


def parse_address(url: str) -> Address:
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("unix", "qga+unix", "virtio"):
        path = parts.path or parts.netloc
        if not path:
            raise ConfigError(f"{url!r}: give a path, e.g. {scheme}:///run/keel/agent.sock")
        return Address(scheme, path=path)
    if scheme in ("tls", "vsock"):
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ConfigError(f"{url!r}: give host and port, e.g. {scheme}://HOST:PORT")
        return Address(scheme, host=parts.hostname, port=port)
    raise ConfigError(
        f"{url!r}: unknown agent channel; use unix://, qga+unix://, tls://, vsock:// or virtio://"
    )
