"""How the ZooKeeper backend connects: the ensemble, TLS, and digest logins.

* ``zookeeper://h1:2181,h2:2181,h3:2181`` lists the ensemble; kazoo connects to one server
  and moves to another when it fails, keeping the session (and its ephemeral nodes) if it
  gets there within the session timeout.
* ``zookeeper+tls://`` (or ``tls=true``) with ``ca``, ``cert``, ``key``, ``verify``: TLS to
  the servers' ``secureClientPort`` (ZooKeeper 3.5+ with Netty; scripts/servers.d/
  zookeeper-tls.sh runs Debian's 3.8 so).
* ``user:password@`` logs in with the digest scheme, and every node Keel creates (``/keel``
  and what is under it) gets the ACL ``digest:user:...:cdrwa``, so other users can neither
  read nor take Keel's locks. The digest scheme never refuses a login by itself (ZooKeeper
  checks it against ACLs only), so ``connect`` reads ``/keel``: a wrong password, or a user
  ``/keel`` does not belong to, is `CredentialsRejected` there, before any lock is taken.
  The first client to connect creates ``/keel`` with its user's ACL.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from kazoo.security import make_digest_acl

from keel._tls import TLSConfig, diagnose, tls_config, tls_error
from keel.errors import KeelError
from keel.urls import URL

_SECRETS = re.compile(r"(auth='[^:']*:)[^']*'|(passwd=)b'(?:[^'\\]|\\.)*'")


class _Redact(logging.Filter):
    """kazoo logs its requests at DEBUG, the digest login's password and the session's
    password among them: mask both before any handler sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "auth=" in text or "passwd=" in text:
            record.msg = _SECRETS.sub(
                lambda m: f"{m.group(1)}***'" if m.group(1) else "passwd=***", text
            )
            record.args = ()
        return True


_REDACT = _Redact()
logging.getLogger("kazoo.client").addFilter(_REDACT)


def client_options(url: URL, options: Mapping[str, Any]) -> tuple[dict[str, Any], TLSConfig | None]:
    """kazoo keywords for the URL: hosts, TLS, digest login and ACL."""
    tls = tls_config(url, options, secure_scheme=url.scheme == "zookeeper+tls")
    kwargs: dict[str, Any] = {"hosts": ",".join(url.endpoints(2181))}
    if tls is not None:
        kwargs.update(
            use_ssl=True,
            verify_certs=tls.verify != "none",
            ca=tls.ca,
            certfile=tls.cert,
            keyfile=tls.key,
        )
    if url.username is not None:
        password = url.password or ""
        kwargs["auth_data"] = [("digest", f"{url.username}:{password}")]
        kwargs["default_acl"] = [make_digest_acl(url.username, password, all=True)]
    return kwargs, tls


async def tls_refusal(url: URL, tls: TLSConfig | None) -> KeelError | None:
    """Why a TLS handshake with the first server fails, if it does (kazoo would only retry)."""
    if tls is None or not url.hosts:
        return None
    first = url.hosts[0]
    reason = await asyncio.to_thread(diagnose, first.host, first.port or 2181, tls)
    return None if reason is None else tls_error(reason, backend="ZooKeeper", server=url.redacted())
