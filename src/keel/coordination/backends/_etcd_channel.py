"""The gRPC channel of the etcd backend: every member of a cluster, TLS, etcd's own logins.

aetcd opens one plaintext channel to one ``host:port``; this builds the channel itself and
hands aetcd the stubs:

* Several endpoints (``etcd://h1:2379,h2:2379,h3:2379``) are one gRPC target listing every
  address (names are resolved once, at connect); gRPC's ``pick_first`` uses one member and
  moves to the next when it fails, so a client whose member died reconnects to a live one by
  itself (the calls in flight fail `BackendUnavailable`, retryable). Any member serves: a
  follower forwards writes to the leader.
* TLS (``etcds://``, or ``tls=true``; options ``ca``, ``cert``, ``key``, ``verify``) uses
  gRPC's own TLS; ``verify=ca`` is not available there (gRPC always checks the name: use the
  name the certificate was issued for), ``verify=none`` neither.
* ``user:password@`` logs in (etcd auth): one Authenticate at connect, then every call carries
  the token (an interceptor). A token stops being accepted: etcd's simple tokens expire
  after ``--auth-token-ttl`` (300 s) without use (lease keep-alives do not count: a
  coordinator that only holds its locks for five minutes loses its token), JWT tokens at
  their expiry however busy the client is, a member that restarts forgets the simple tokens
  it knew, and any change to etcd's users or roles makes every older token "old". On such a
  refusal (``invalid auth token``, ``revision of auth store is old``) the interceptor logs in
  again, once for all the calls that met it, and retries the call; a password the server no
  longer accepts is `CredentialsRejected` from that call, never a loop.

Refusals at connect are typed: a bad user or password `CredentialsRejected`; a failed TLS
handshake (gRPC says only "unavailable") is probed with Python's ssl to say why, `TLSError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aetcd
import grpc
import grpc.aio
from aetcd import rpc, watcher
from grpc.aio import AioRpcError

from keel._tls import TLSConfig, credentials_rejected, diagnose, tls_config, tls_error
from keel.errors import ConfigError, KeelError
from keel.urls import URL

_AUTHENTICATE = "/etcdserverpb.Auth/Authenticate"
# etcd's answers to a token it no longer takes (rpctypes.ErrInvalidAuthToken and
# ErrAuthOldRevision): log in again. A missing token (auth turned on later) says "user name
# is empty".
_TOKEN_REFUSED = ("invalid auth token", "revision of auth store is old", "user name is empty")


def token_refused(exc: BaseException) -> bool:
    """Whether etcd refused a call for its token (a login again mends it)."""
    if not isinstance(exc, AioRpcError):
        return False
    if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        return False
    return any(text in (exc.details() or "") for text in _TOKEN_REFUSED)


class _Token(  # grpc ships no type information (pyproject's mypy overrides)
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds etcd's auth token to every call; a unary call whose token etcd refuses logs in
    again (``relogin``) and is sent once more."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.relogin: Callable[[str | None], Awaitable[None]] | None = None

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self.token is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), ("token", self.token))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method == _AUTHENTICATE:  # etcd refuses a login that carries a dead token
            return await continuation(details, request)
        if self.relogin is None:
            return await continuation(self._details(details), request)
        token = self.token
        call = await continuation(self._details(details), request)
        try:
            await call
        except AioRpcError as exc:
            if not token_refused(exc):
                raise
            await self.relogin(token)
            return await continuation(self._details(details), request)
        return call

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _targets(url: URL) -> list[tuple[str, str]]:
    """Every endpoint as (gRPC target of its address, the host name the URL gives it)."""
    found: list[tuple[str, str]] = []
    for host in url.hosts or ():
        port = host.port or 2379
        try:
            infos = socket.getaddrinfo(host.host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"etcd endpoint {host.host}: cannot resolve it ({exc})") from None
        for family, _, _, _, sockaddr in infos[:1]:
            ip = str(sockaddr[0])
            v6 = family == socket.AF_INET6
            found.append((f"ipv6:[{ip}]:{port}" if v6 else f"ipv4:{ip}:{port}", host.host))
    return found or [("ipv4:127.0.0.1:2379", "127.0.0.1")]


def _plan(url: URL, tls: bool) -> list[tuple[str, str]]:
    """The channels to open, as (target, name to check): one listing every member, which
    gRPC's pick_first moves along by itself, unless TLS must check members of different
    names: gRPC checks one name per channel, so then one channel per member."""
    endpoints = _targets(url)
    if tls and len({name for _, name in endpoints}) > 1:
        return endpoints
    scheme = endpoints[0][0].partition(":")[0]
    addresses = [target.partition(":")[2] for target, _ in endpoints]
    return [(f"{scheme}:{','.join(addresses)}", endpoints[0][1])]


class Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel of our own (see the module docstring)."""

    def __init__(
        self, url: URL, options: Mapping[str, Any], grpc_options: Mapping[str, Any]
    ) -> None:
        super().__init__("127.0.0.1", 2379, timeout=None, options=dict(grpc_options))
        self._url = url
        self._tls: TLSConfig | None = tls_config(url, options, secure_scheme=url.scheme == "etcds")
        if self._tls is not None and self._tls.verify != "full":
            raise ConfigError(
                f"{url.redacted()}: verify={self._tls.verify} is not available over gRPC; "
                "use the host name the server's certificate names"
            )
        self._login = (url.username, url.password)
        self._interceptor = _Token()
        self._relogin_lock = asyncio.Lock()
        self.logins = 0  # Authenticate calls made (1 at connect, then one per refusal)
        self._plan: list[tuple[str, str]] = []
        self._channels: dict[int, tuple[Any, Any]] = {}  # index -> (channel, watcher)
        self.current = 0  # the channel in use (see rotate)

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        self._plan = _plan(self._url, self._tls is not None)
        self._bind(0)
        self._connected.set()

    def _bind(self, index: int) -> None:
        """Use channel ``index`` of the plan (opened on first use) for every stub."""
        if index not in self._channels:
            target, name = self._plan[index]
            options = list(self._options.items())
            interceptors = [self._interceptor]
            if self._tls is not None:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=_read(self._tls.ca),
                    private_key=_read(self._tls.key),
                    certificate_chain=_read(self._tls.cert),
                )
                options.append(("grpc.ssl_target_name_override", name))
                channel = grpc.aio.secure_channel(
                    target, credentials, options=options, interceptors=interceptors
                )
            else:
                channel = grpc.aio.insecure_channel(
                    target, options=options, interceptors=interceptors
                )
            self._channels[index] = (
                channel,
                watcher.Watcher(rpc.WatchStub(channel), timeout=self._timeout),
            )
        self.channel, self._watcher = self._channels[index]
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.auth_stub = rpc.AuthStub(self.channel)
        self.current = index

    def rotate(self, failed: int) -> None:
        """Channel ``failed`` answered "unavailable": the next calls go to the next member
        (with one channel per member; pick_first does it inside the one channel else)."""
        if len(self._plan) > 1 and self.current == failed:
            self._bind((failed + 1) % len(self._plan))

    async def reach(self, timeout: float) -> None:
        """Log in (if the URL has a user) and read once, on the first member that answers,
        trying each in turn within ``timeout``. ``wait_for_ready``: a first connection that
        fails transiently (a loaded machine) is retried by gRPC, not failed at once."""
        tries = len(self._plan)
        for attempt in range(tries):
            index = self.current
            try:
                await self.login(max(2.0, timeout / tries))
                await self.kvstub.Range(
                    rpc.RangeRequest(key=b"/keel/"),
                    timeout=max(2.0, timeout / tries),
                    wait_for_ready=True,
                )
            except AioRpcError as exc:
                down = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                if exc.code() not in down or attempt == tries - 1:
                    raise
                self.rotate(index)
            else:
                return

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel, watch in channels:
            with contextlib.suppress(Exception):
                await watch.shutdown()
            with contextlib.suppress(Exception):
                await channel.close()
        self.channel = None
        self._connected.clear()

    async def login(self, timeout: float) -> None:
        """etcd auth, if the URL has a user: one Authenticate; its token goes on every call,
        and a refused token logs in again (see the module docstring)."""
        if self._login[0] is None:
            return
        await self._authenticate(timeout)

        async def relogin(refused: str | None) -> None:
            async with self._relogin_lock:
                if self._interceptor.token == refused:  # else another call did it already
                    await self._authenticate(timeout)

        self._interceptor.relogin = relogin

    async def refresh(self, refused: str | None) -> None:
        """Log in again after etcd refused the token ``refused`` on a call the interceptor
        does not retry (a stream: lease keep-alives); a no-op without a user."""
        if self._interceptor.relogin is not None:
            await self._interceptor.relogin(refused)

    @property
    def token(self) -> str | None:
        return self._interceptor.token

    async def _authenticate(self, timeout: float) -> None:
        user, password = self._login
        assert user is not None
        self.logins += 1
        try:
            reply = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=user, password=password or ""),
                timeout=timeout,
                wait_for_ready=True,
            )
        except AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                raise credentials_rejected(
                    backend="etcd", server=self._url.redacted(), user=user
                ) from None
            raise
        self._interceptor.token = reply.token

    async def refusal(self) -> KeelError | None:
        """Over TLS: why a handshake fails, if it does with any member the URL lists (gRPC
        says only "unavailable"); a member that is down is no refusal."""
        if self._tls is None or not self._url.hosts:
            return None
        tls, hosts = self._tls, self._url.hosts
        reasons = await asyncio.gather(
            *(asyncio.to_thread(diagnose, h.host, h.port or 2379, tls) for h in hosts)
        )
        for host, reason in zip(hosts, reasons, strict=True):
            if reason is not None:
                where = f"{self._url.redacted()} ({host.address(2379)})"
                return tls_error(reason, backend="etcd", server=where)
        return None


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()
