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

import ssl

import asyncpg

from keel import urls
from keel._tls import TLS_OPTIONS, credentials_rejected, tls_config, tls_failure
from keel.errors import KeelError

_REFUSED_LOGIN = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
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
