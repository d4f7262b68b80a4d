"""How the PostgreSQL store connects: libpq's URL, Keel's shared TLS names, typed refusals.

The URL is libpq's (asyncpg reads it): several hosts for a primary and its replicas,
``postgresql://u:p@h1:5432,h2:5432/db?target_session_attrs=read-write`` (a connection goes to
whichever host accepts writes now, so after a failover the store reconnects to the new
primary by itself), and TLS with libpq's own ``sslmode=verify-full&sslrootcert=...&
sslcert=...&sslkey=...``. Keel's names ``ca``, ``cert``, ``key``, ``verify`` (and ``tls``)
work too, as on every backend: they become an SSL context and leave the URL (``verify=full``
is ``sslmode=verify-full``). A refused password is `CredentialsRejected`, a refused
certificate `TLSError`, both from ``open``; the URL in a message never shows the password.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

import asyncpg
from asyncpg import connect_utils

from keel import urls
from keel._tls import (
    TLS_OPTIONS,
    TLSConfig,
    credentials_rejected,
    diagnose,
    tls_config,
    tls_error,
    tls_failure,
)
from keel.errors import KeelError

_REFUSED_LOGIN = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
)


def _retrieved_when_lost(lost: Callable[[Any, Exception | None], None]) -> Callable[..., None]:
    def connection_lost(self: Any, exc: Exception | None) -> None:
        lost(self, exc)
        if self.on_data.done() and not self.on_data.cancelled():
            self.on_data.exception()  # marks it retrieved; an awaiter still gets it

    return connection_lost


# asyncpg's sslmode=prefer (its default) first asks for TLS over a socket whose protocol keeps
# a Future for the answer. A connect cancelled inside loop.create_connection (a request whose
# client left while the pool was opening a connection for it) drops that protocol; its
# connection_lost then sets an exception nobody will await, and asyncio logs "Future exception
# was never retrieved" for every such cancel (asyncpg 0.30 to 0.32).
if hasattr(connect_utils, "TLSUpgradeProto"):
    connect_utils.TLSUpgradeProto.connection_lost = _retrieved_when_lost(  # type: ignore[method-assign]
        connect_utils.TLSUpgradeProto.connection_lost
    )


def dsn_and_ssl(url: str) -> tuple[str, ssl.SSLContext | None]:
    """The URL for asyncpg (without Keel's TLS names) and the SSL context they ask for."""
    parsed = urls.parse(url)
    tls = tls_config(parsed)
    if not any(name in parsed.options for name in TLS_OPTIONS):
        return url, None
    base, _, query = url.partition("?")
    kept = [p for p in query.split("&") if p and p.partition("=")[0] not in TLS_OPTIONS]
    return base + ("?" + "&".join(kept) if kept else ""), None if tls is None else tls.context()


def refusal(exc: BaseException, url: str) -> KeelError | None:
    """A refused login or certificate (retrying will not mend it), else None."""
    parsed = urls.parse(url)
    failed = tls_failure(exc, backend="PostgreSQL", server=parsed.redacted())
    if failed is not None:
        return failed
    if isinstance(exc, _REFUSED_LOGIN):
        return credentials_rejected(
            backend="PostgreSQL", server=parsed.redacted(), user=parsed.username
        )
    return None


# libpq's sslmode -> Keel's verify (the modes that ask for TLS at all)
_SSLMODES = {"verify-full": "full", "verify-ca": "ca", "require": "none"}
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)  # PostgreSQL's "SSLRequest" packet


def _probe_config(parsed: urls.URL) -> TLSConfig | None:
    """The TLS settings a URL asks for, in Keel's names or libpq's (for `hidden_refusal`)."""
    config = tls_config(parsed)
    if config is not None:
        return config
    options = parsed.options
    verify = _SSLMODES.get(options.get("sslmode", ""))
    if verify is None:
        return None
    return TLSConfig(
        ca=options.get("sslrootcert"),
        cert=options.get("sslcert"),
        key=options.get("sslkey"),
        verify=verify if verify != "none" or "sslrootcert" not in options else "ca",
    )


def _ssl_request(sock: socket.socket) -> bool:
    sock.sendall(_SSL_REQUEST)
    return sock.recv(1) == b"S"


async def hidden_refusal(exc: BaseException, url: str) -> KeelError | None:
    """The `TLSError` behind a TLS connect that asyncpg reports only as a closed connection
    (``ConnectionDoesNotExistError``, a reset), or None. Under TLS 1.3 PostgreSQL refuses a
    client certificate after the handshake, while asyncpg already writes its startup packet:
    the server's alert may lose to its reset. One probe of the first host, which reads
    before it writes, tells which."""
    if not isinstance(
        exc, asyncpg.PostgresConnectionError | asyncpg.InterfaceError | ConnectionError
    ):
        return None
    parsed = urls.parse(url)
    config = _probe_config(parsed)
    if config is None or not parsed.hosts:
        return None
    first = parsed.hosts[0]
    reason = await asyncio.to_thread(
        diagnose, first.host, first.port or 5432, config, prelude=_ssl_request
    )
    if reason is None:
        return None
    return tls_error(reason, backend="PostgreSQL", server=parsed.redacted())
