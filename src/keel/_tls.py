"""TLS and credentials for every backend: one set of option names, one context builder, one
translation of handshake and login failures into typed errors.

Options, the same names on every backend, in the URL query or as keyword options, and as
``KEEL_TLS_*`` environment variables that fill what the URL and keywords leave out:

* ``ca`` (``KEEL_TLS_CA``): PEM file of the certificate authorities to trust (default: the
  system's).
* ``cert`` and ``key`` (``KEEL_TLS_CERT``, ``KEEL_TLS_KEY``): the client certificate chain
  and its private key, PEM, for servers that ask for one.
* ``verify`` (``KEEL_TLS_VERIFY``): ``full`` (the default: the CA and the host name),
  ``ca`` (the CA only, for servers reached by an address their certificate does not name) or
  ``none`` (no check at all: a lab only; a warning is logged on every connect).
* ``tls``: ``true`` turns TLS on for a scheme that does not say it.

TLS is on when the scheme says so (``amqps``, ``nats+tls``/``tls``, ``rediss``,
``rediss+sentinel``, ``etcds``, ``zookeeper+tls``; PostgreSQL's own ``sslmode``), when
``tls=true``, or when the URL or keywords name a ``ca`` or ``cert``; the environment alone never
turns it on, so one service can reach a TLS broker and a plaintext cache.

Failures: a bad option (a missing file, a key that does not match its certificate) is a
`ConfigError` naming the option; a refused handshake is a `TLSError` whose ``reason`` says
which side and why; a refused login is `CredentialsRejected`. Both are raised by ``connect``,
before any work is accepted, and neither message ever holds a password or a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from keel.errors import ConfigError, CredentialsRejected, TLSError
from keel.urls import URL

log = logging.getLogger("keel.tls")

TLS_OPTIONS = ("tls", "ca", "cert", "key", "verify")
_VERIFY = ("full", "ca", "none")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# OpenSSL verify codes (X509_V_ERR_*) -> reason.
_VERIFY_CODES = {
    9: "not-yet-valid",
    10: "expired",
    2: "unknown-ca",
    18: "unknown-ca",
    19: "unknown-ca",
    20: "unknown-ca",
    21: "unknown-ca",
    62: "hostname",
    64: "hostname",
}
# Handshake failure texts (OpenSSL reason codes, also in gRPC's and redis-py's messages).
_TEXTS = (
    ("CERTIFICATE_EXPIRED", "client-cert-expired"),  # the server's alert about our cert
    ("certificate has expired", "expired"),
    ("certificate is not yet valid", "not-yet-valid"),
    ("TLSV1_ALERT_UNKNOWN_CA", "client-cert-rejected"),
    ("BAD_CERTIFICATE", "client-cert-rejected"),
    ("ALERT_CERTIFICATE_UNKNOWN", "client-cert-rejected"),  # Java's word for it
    ("CERTIFICATE_REQUIRED", "client-cert-required"),
    ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "client-cert-required"),
    ("Hostname mismatch", "hostname"),
    ("IP address mismatch", "hostname"),
    ("unable to get local issuer certificate", "unknown-ca"),
    ("self-signed certificate", "unknown-ca"),
    ("self signed certificate", "unknown-ca"),
    ("WRONG_VERSION_NUMBER", "not-tls"),
    ("CERTIFICATE_VERIFY_FAILED", "unverified"),
)
_ADVICE = {
    "unknown-ca": "the server's certificate is not signed by a CA in ca=; give the CA that "
    "signed it",
    "expired": "the server's certificate has expired; the server needs a new one",
    "not-yet-valid": "the server's certificate is not valid yet (check the clocks)",
    "hostname": "the server's certificate does not name the host in the URL; use the name it "
    "was issued for, or verify=ca",
    "client-cert-expired": "the server refused our client certificate (cert=) as expired",
    "client-cert-rejected": "the server refused our client certificate (cert=): not signed by "
    "a CA it trusts",
    "client-cert-required": "the server wants a client certificate: give cert= and key=",
    "not-tls": "the server does not speak TLS on that port",
    "unverified": "the server's certificate did not verify against ca=",
    "handshake": "the TLS handshake failed",
}


@dataclass(frozen=True)
class TLSConfig:
    """Resolved TLS options of one backend URL; `context` builds (once) the client context."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    verify: str = "full"
    _context: list[ssl.SSLContext] = field(default_factory=list, compare=False, repr=False)

    @property
    def check_hostname(self) -> bool:
        return self.verify == "full"

    def context(self) -> ssl.SSLContext:
        if self._context:
            return self._context[0]
        if self.verify == "none":
            log.warning("TLS certificate verification is off (verify=none)")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"TLS option {name}={path}: no such readable file")
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS option ca={self.ca}: not a PEM CA file ({exc})") from None
        if self.cert is not None:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(
                    f"TLS options cert={self.cert} key={self.key}: cannot load the client "
                    f"certificate and its key ({exc.__class__.__name__}: the key must match "
                    "the certificate, both PEM)"
                ) from None
            self._check_not_expired()
        elif self.key is not None:
            raise ConfigError("TLS option key= needs cert= (the certificate it belongs to)")
        ctx.check_hostname = self.check_hostname
        if self.verify == "none":
            ctx.verify_mode = ssl.CERT_NONE
        self._context.append(ctx)
        return ctx

    def _check_not_expired(self) -> None:
        """Our own client certificate, checked here: servers refuse an expired one with
        alerts that do not all say why (Go's say "bad certificate")."""
        decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
        if decode is None or self.cert is None:
            return
        try:
            not_after = ssl.cert_time_to_seconds(decode(self.cert)["notAfter"])
        except (ssl.SSLError, OSError, KeyError, ValueError):
            return  # load_cert_chain accepted it; the server will judge
        if not_after < time.time():
            raise TLSError(
                f"TLS option cert={self.cert}: our client certificate expired on "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(not_after))}; "
                "the server will refuse it: renew it",
                reason="client-cert-expired",
                backend="client",
                server="-",
            )


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"TLS option tls={value!r}: expected true or false")


def tls_config(
    url: URL, options: Mapping[str, Any] | None = None, *, secure_scheme: bool = False
) -> TLSConfig | None:
    """The TLS options of a backend URL (keywords over URL query over ``KEEL_TLS_*``), or
    None when TLS is off for it (see the module docstring for when it is on).

    Contradictions are refused, never resolved quietly toward plaintext: ``tls=false`` on a
    TLS scheme (``rediss://...?tls=false``) or beside ``ca``/``cert``/``key``, and
    ``verify=none`` beside a ``ca`` it would ignore, are `ConfigError`s."""
    given = {k: v for k, v in url.options.items() if k in TLS_OPTIONS}
    given.update({k: v for k, v in (options or {}).items() if k in TLS_OPTIONS and v is not None})
    on = secure_scheme or "ca" in given or "cert" in given
    if "tls" in given:
        on = _flag(given["tls"])
        if not on and secure_scheme:
            raise ConfigError(
                f"{url.redacted()}: tls=false contradicts the {url.scheme}:// scheme, which "
                "means TLS; use the plaintext scheme to turn TLS off"
            )
        files = [name for name in ("ca", "cert", "key") if name in given]
        if not on and files:
            raise ConfigError(
                f"{url.redacted()}: tls=false contradicts {', '.join(f'{n}=' for n in files)}; "
                "drop one"
            )
    if not on:
        if "key" in given or "verify" in given:
            raise ConfigError(
                f"{url.redacted()}: {'key' if 'key' in given else 'verify'}= means TLS, but "
                "TLS is off for this URL: use the TLS scheme, tls=true or ca="
            )
        return None
    values: dict[str, str | None] = {}
    for name in ("ca", "cert", "key", "verify"):
        value = given.get(name)
        if value is None:
            value = os.environ.get(f"KEEL_TLS_{name.upper()}") or None
        values[name] = None if value is None else str(value)
    verify = (values["verify"] or "full").lower()
    if verify in _TRUE:
        verify = "full"
    elif verify in _FALSE:
        verify = "none"
    if verify not in _VERIFY:
        raise ConfigError(f"TLS option verify={verify!r}: expected one of {', '.join(_VERIFY)}")
    if verify == "none" and "ca" in given and "verify" in given:
        raise ConfigError(
            f"{url.redacted()}: verify=none ignores ca=: drop one (verify=ca checks the CA "
            "without the host name)"
        )
    config = TLSConfig(values["ca"], values["cert"], values["key"], verify)
    config.context()  # a bad file is a ConfigError now, before anything connects
    return config


def without_tls_options(options: Mapping[str, str]) -> dict[str, str]:
    """The URL options a backend's own client must not see (it would not know them)."""
    return {k: v for k, v in options.items() if k not in TLS_OPTIONS}


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if current in seen or len(seen) > 20:
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(x for x in (current.__cause__, current.__context__) if x is not None)
    return seen


def tls_reason(exc: BaseException | str) -> str | None:
    """Why a TLS handshake failed, from an exception (or a client library's message)."""
    texts: list[str] = []
    for item in [exc] if isinstance(exc, str) else _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            code = _VERIFY_CODES.get(item.verify_code)
            if code is not None:
                return code
        if isinstance(item, ssl.SSLError) and item.reason:
            texts.append(str(item.reason))
        texts.append(str(item))
    for text in texts:
        for needle, reason in _TEXTS:
            if needle.lower() in text.lower():
                return reason
    return None


def tls_error(reason: str, *, backend: str, server: str) -> TLSError:
    advice = _ADVICE.get(reason, _ADVICE["handshake"])
    return TLSError(
        f"{backend} at {server}: TLS failed ({reason}): {advice}",
        reason=reason,
        backend=backend,
        server=server,
    )


def tls_failure(exc: BaseException | str, *, backend: str, server: str) -> TLSError | None:
    """A `TLSError` if ``exc`` is a failed TLS handshake, else None."""
    reason = tls_reason(exc)
    return None if reason is None else tls_error(reason, backend=backend, server=server)


def credentials_rejected(
    *,
    backend: str,
    server: str,
    user: str | None,
    detail: str = "",
    advice: str = "check the user name and password",
) -> CredentialsRejected:
    who = f"user {user!r}" if user else "the credentials given"
    more = f" ({detail})" if detail else ""
    return CredentialsRejected(
        f"{backend} at {server} refused {who}{more}: {advice}",
        backend=backend,
        server=server,
        user=user,
    )


async def hidden_refusal(
    exc: BaseException, host: str, port: int, config: TLSConfig | None, *, backend: str, server: str
) -> TLSError | None:
    """The `TLSError` behind a TLS connect that failed with a bare reset, or None. Under TLS
    1.3 a server refuses a client certificate after the handshake: a client that writes at
    once (an AMQP header) may get the server's reset instead of its alert, so one `diagnose`
    probe, which reads first, tells which."""
    if config is None:
        return None
    chain = _chain(exc)  # aiormq says "Server connection reset: ConnectionResetError(...)"
    if not any(
        isinstance(e, ConnectionResetError) or "ConnectionResetError" in str(e) for e in chain
    ):
        return None
    reason = await asyncio.to_thread(diagnose, host, port, config)
    return None if reason is None else tls_error(reason, backend=backend, server=server)


def diagnose(
    host: str,
    port: int,
    config: TLSConfig,
    *,
    server_hostname: str | None = None,
    timeout: float = 3.0,
    prelude: Callable[[socket.socket], bool] | None = None,
) -> str | None:
    """Handshake with ``host:port`` using ``config`` and say why it fails (a `tls_reason`),
    or None if it succeeds. For client libraries that report a failed handshake only as
    "unavailable" (gRPC, kazoo): run in a thread, on a connect that already failed.

    A server refuses a client certificate after the handshake under TLS 1.3: the alert
    arrives on the first read, so the probe reads once, briefly, after the handshake.
    ``prelude(sock)``, for protocols that ask for TLS in plaintext first (PostgreSQL's
    SSLRequest), runs before the handshake; False means the server declined TLS."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            if prelude is not None and not prelude(raw):
                return "not-tls"
            ctx = config.context()
            with ctx.wrap_socket(raw, server_hostname=server_hostname or host) as tls:
                tls.settimeout(0.5)
                with contextlib.suppress(TimeoutError, socket.timeout):
                    tls.recv(1)
    except (ssl.SSLError, OSError) as exc:
        return tls_reason(exc)
    return None
