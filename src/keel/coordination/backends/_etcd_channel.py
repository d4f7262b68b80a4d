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
  the token (an interceptor). etcd's simple tokens expire after ``--auth-token-ttl`` (5 min)
  without use; the backend's lease keep-alives use it every few seconds.

Refusals at connect are typed: a bad user or password `CredentialsRejected`; a failed TLS
handshake (gRPC says only "unavailable") is probed with Python's ssl to say why, `TLSError`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

import aetcd
import grpc
import grpc.aio
from aetcd import rpc, watcher
from grpc.aio import AioRpcError

from keel._tls import TLSConfig, credentials_rejected, diagnose, tls_config, tls_error
from keel.errors import ConfigError, KeelError
from keel.urls import URL


class _Token(  # grpc ships no type information (pyproject's mypy overrides)
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.aio.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds etcd's auth token to every call."""

    def __init__(self) -> None:
        self.token: str | None = None

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        if self.token is None:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()), ("token", self.token))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def _target(url: URL) -> tuple[str, str]:
    """(gRPC target listing every endpoint's address, the first endpoint's host name)."""
    addresses: list[str] = []
    for host in url.hosts or ():
        port = host.port or 2379
        try:
            infos = socket.getaddrinfo(host.host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConfigError(f"etcd endpoint {host.host}: cannot resolve it ({exc})") from None
        for family, _, _, _, sockaddr in infos[:1]:
            ip = str(sockaddr[0])
            addresses.append(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    if not addresses:
        addresses = ["127.0.0.1:2379"]
    scheme = "ipv6" if addresses[0].startswith("[") else "ipv4"
    first = url.hosts[0].host if url.hosts else "127.0.0.1"
    return f"{scheme}:{','.join(addresses)}", first


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

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        target, first = _target(self._url)
        options = list(self._options.items())
        interceptors = [self._interceptor]
        if self._tls is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(self._tls.ca),
                private_key=_read(self._tls.key),
                certificate_chain=_read(self._tls.cert),
            )
            options.append(("grpc.ssl_target_name_override", first))
            self.channel = grpc.aio.secure_channel(
                target, credentials, options=options, interceptors=interceptors
            )
        else:
            self.channel = grpc.aio.insecure_channel(
                target, options=options, interceptors=interceptors
            )
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.auth_stub = rpc.AuthStub(self.channel)
        self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()

    async def login(self, timeout: float) -> None:
        """etcd auth, if the URL has a user: one Authenticate; its token goes on every call."""
        user, password = self._login
        if user is None:
            return
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
        """After a failed connect over TLS: why the handshake fails, if it does."""
        if self._tls is None or not self._url.hosts:
            return None
        first = self._url.hosts[0]
        reason = await asyncio.to_thread(diagnose, first.host, first.port or 2379, self._tls)
        if reason is None:
            return None
        return tls_error(reason, backend="etcd", server=self._url.redacted())


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as file:
        return file.read()
