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
import socket
import ssl
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from keel.errors import (
    AgentIdentityMismatch,
    AgentUnavailable,
    ChannelUnsupported,
    ConfigError,
    KeelError,
)

READ_SIZE = 1024 * 1024
VMADDR_CID_HOST = 2
_UNSUPPORTED = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.ENODEV, errno.EPROTONOSUPPORT}


class Channel(Protocol):
    """A byte stream to one peer. ``peer`` names who is on the other end, for audit lines."""

    peer: str

    async def read(self, max_bytes: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

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


class StreamChannel:
    """A channel over an asyncio stream pair (unix, TCP+TLS, vsock, character device)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer

    async def read(self, max_bytes: int) -> bytes:
        with map_errors(f"read from {self.peer}"):
            return await self._reader.read(max_bytes)

    async def write(self, data: bytes) -> None:
        with map_errors(f"write to {self.peer}"):
            self._writer.write(data)
            await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)
        except asyncio.CancelledError:
            # A transport broken mid-write may have its close waiter cancelled; only our
            # own cancellation goes on up.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        except Exception:
            pass


class _DeviceChannel:
    """A character device (the guest end of virtio-serial), read and written without threads."""

    def __init__(self, path: str, fd: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self.peer = f"virtio:{path}"
        self._loop = asyncio.get_running_loop()

    async def read(self, max_bytes: int) -> bytes:
        while True:
            with map_errors(f"read from {self.peer}"):
                try:
                    return os.read(self._fd, max_bytes)
                except BlockingIOError:
                    pass
            ready = self._loop.create_future()
            self._loop.add_reader(self._fd, ready.set_result, None)
            try:
                await ready
            finally:
                self._loop.remove_reader(self._fd)

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            with map_errors(f"write to {self.peer}"):
                try:
                    view = view[os.write(self._fd, view) :]
                    continue
                except BlockingIOError:
                    pass
            ready = self._loop.create_future()
            self._loop.add_writer(self._fd, ready.set_result, None)
            try:
                await ready
            finally:
                self._loop.remove_writer(self._fd)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _wrap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> Channel:
    return StreamChannel(reader, writer, peer)


def _unix_peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
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


def check_identity(writer: asyncio.StreamWriter, expected: str | None) -> str:
    """The TLS peer's first name; raise `AgentIdentityMismatch` unless it names ``expected``."""
    names = cert_names(writer.get_extra_info("peercert"))
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
    with map_errors(f"connect to unix:{path}"):
        reader, writer = await asyncio.open_unix_connection(path, limit=READ_SIZE)
    return _wrap(reader, writer, f"unix:{path}")


async def open_tls(host: str, port: int, context: ssl.SSLContext, instance_id: str) -> Channel:
    """Connect with mutual TLS and refuse a peer whose certificate is not ``instance_id``'s."""
    with map_errors(f"connect to tls:{host}:{port}"):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=instance_id, limit=READ_SIZE
        )
    try:
        name = check_identity(writer, instance_id)
    except AgentIdentityMismatch:
        await StreamChannel(reader, writer, "refused").close()
        raise
    return _wrap(reader, writer, f"tls:{name}@{host}:{port}")


async def open_vsock(cid: int, port: int) -> Channel:
    with map_errors(f"connect to vsock:{cid}:{port}"):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (cid, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        except BaseException:
            sock.close()
            raise
    return _wrap(reader, writer, f"vsock:{cid}:{port}")


async def open_virtio(path: str) -> Channel:
    """The guest end of virtio-serial. A unix socket at ``path`` stands in for the device."""
    with map_errors(f"open virtio:{path}"):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            return await open_unix(path)
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    return _DeviceChannel(path, fd)


# --- listening ------------------------------------------------------------------------------

Handler = Callable[[Channel], Awaitable[None]]


async def listen_unix(path: str, handler: Handler) -> asyncio.Server:
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handler(_wrap(reader, writer, _unix_peer(writer)))

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with map_errors(f"listen on unix:{path}"):
        return await asyncio.start_unix_server(accepted, path, limit=READ_SIZE)


async def listen_tls(
    host: str, port: int, context: ssl.SSLContext, handler: Handler
) -> asyncio.Server:
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = check_identity(writer, None)
        await handler(_wrap(reader, writer, f"tls:{peer}"))

    with map_errors(f"listen on tls:{host}:{port}"):
        return await asyncio.start_server(
            accepted, host, port, ssl=context, limit=READ_SIZE, reuse_address=True
        )


async def listen_vsock(port: int, handler: Handler, cid: int = -1) -> asyncio.Server:
    """Host side: accept agents dialing in. The CID comes from ``accept()``, which the guest
    cannot forge; ``cid`` -1 is VMADDR_CID_ANY."""

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_cid, _ = writer.get_extra_info("peername")
        await handler(_wrap(reader, writer, f"vsock:cid={peer_cid}"))

    with map_errors(f"listen on vsock:{cid}:{port}"):
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.bind((cid & 0xFFFFFFFF, port))
            sock.listen(16)
            sock.setblocking(False)
            return await asyncio.start_server(accepted, sock=sock, limit=READ_SIZE)
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
