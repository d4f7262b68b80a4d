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
from keel.errors import ConfigError, KeelError
from keel.urls import URL

# What kazoo logs that carries a secret, at DEBUG and below (BLATHER is 5): the digest login
# (``Auth(..., auth='user:password')``, repr'd with either quote), the session password in a
# ``Connect(..., passwd=b'...')`` request, and ``session_passwd: b'<hex>'`` lines.
_QUOTED = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_SECRETS = re.compile(
    rf"(?P<auth>auth=)(?P<q>['\"])(?P<user>[^:'\"]*):(?:[^\\]|\\.)*?(?P=q)"
    rf"|(?P<passwd>passwd=)b?{_QUOTED}"
    rf"|(?P<session>session_passwd: )b?{_QUOTED}"
)
_passwords: set[str] = set()  # digest passwords in use, also masked wherever they appear


def _mask(match: re.Match[str]) -> str:
    if match.group("auth"):
        return f"{match.group('auth')}{match.group('q')}{match.group('user')}:***{match.group('q')}"
    return f"{match.group('passwd') or match.group('session')}***"


def redact_log(text: str) -> str:
    """kazoo's log text with every login and session password masked."""
    text = _SECRETS.sub(_mask, text)
    for password in _passwords:
        for form in (password, repr(password)[1:-1]):
            if form:
                text = text.replace(form, "***")
    return text


class _Redact(logging.Filter):
    """kazoo logs its requests at DEBUG and BLATHER, the digest login's password and the
    session's password among them: mask them before any handler sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = redact_log(text)
        if masked != text:
            record.msg, record.args = masked, ()
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
            # kazoo checks no host name unless told (its default): each server's
            # certificate must name the host the URL gives for it, as on every backend.
            check_hostname=tls.check_hostname,
            ca=tls.ca,
            certfile=tls.cert,
            keyfile=tls.key,
        )
    if url.username is not None:
        if ":" in url.username:
            raise ConfigError(
                f"{url.redacted()}: a ZooKeeper digest user name cannot hold ':' (ZooKeeper "
                "splits user:password at the first one)"
            )
        password = url.password or ""
        if len(password) >= 3:  # shorter ones would mask every such run of characters
            _passwords.add(password)
        kwargs["auth_data"] = [("digest", f"{url.username}:{password}")]
        kwargs["default_acl"] = [make_digest_acl(url.username, password, all=True)]
    return kwargs, tls


async def tls_refusal(url: URL, tls: TLSConfig | None) -> KeelError | None:
    """Why a TLS handshake fails, if it does with any server the URL lists (kazoo would only
    retry, and would keep moving to the servers that refuse): a server that is down is no
    refusal, one whose certificate fails is."""
    if tls is None or not url.hosts:
        return None
    reasons = await asyncio.gather(
        *(asyncio.to_thread(diagnose, h.host, h.port or 2181, tls) for h in url.hosts)
    )
    for host, reason in zip(url.hosts, reasons, strict=True):
        if reason is not None:
            return tls_error(
                reason, backend="ZooKeeper", server=f"{url.redacted()} ({host.address(2181)})"
            )
    return None
