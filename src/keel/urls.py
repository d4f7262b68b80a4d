"""Backend URLs resolved to backend classes by scheme, imported lazily.

The core never imports a backend by name: it asks this module. A missing client library is a
`MissingExtra` naming the pip extra; an unknown scheme is an `UnknownScheme` listing the known
ones. Third-party backends register through the entry point groups ``keel.transports``,
``keel.coordination`` and ``keel.hub.stores`` (value ``module:Class``).
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from keel.errors import ConfigError, MissingExtra, UnknownScheme


@dataclass(frozen=True)
class BackendRef:
    """Where a backend lives and which extra brings its client library."""

    target: str  # "module:attribute"
    extra: str | None = None


# kind -> scheme -> backend. Later parts add their kinds here, never elsewhere.
_BUILTIN: dict[str, dict[str, BackendRef]] = {
    "transport": {
        "memory": BackendRef("keel.messaging.transports.memory:MemoryTransport"),
        "rabbit": BackendRef(
            "keel.messaging.transports.rabbitmq:RabbitTransport", extra="rabbitmq"
        ),
        "amqp": BackendRef("keel.messaging.transports.rabbitmq:RabbitTransport", extra="rabbitmq"),
        "amqps": BackendRef("keel.messaging.transports.rabbitmq:RabbitTransport", extra="rabbitmq"),
        "nats": BackendRef("keel.messaging.transports.nats:NatsTransport", extra="nats"),
        "nats+tls": BackendRef("keel.messaging.transports.nats:NatsTransport", extra="nats"),
        "redis": BackendRef("keel.messaging.transports.redis:RedisTransport", extra="redis"),
        "rediss": BackendRef("keel.messaging.transports.redis:RedisTransport", extra="redis"),
        "redis+sentinel": BackendRef(
            "keel.messaging.transports.redis:RedisTransport", extra="redis"
        ),
        "rediss+sentinel": BackendRef(
            "keel.messaging.transports.redis:RedisTransport", extra="redis"
        ),
    },
    "coordination": {
        "sqlite": BackendRef("keel.coordination.backends.sqlite:SqliteBackend"),
        "etcd": BackendRef("keel.coordination.backends.etcd:EtcdBackend", "etcd"),
        "etcds": BackendRef("keel.coordination.backends.etcd:EtcdBackend", "etcd"),
        "zookeeper": BackendRef(
            "keel.coordination.backends.zookeeper:ZookeeperBackend", "zookeeper"
        ),
        "zookeeper+tls": BackendRef(
            "keel.coordination.backends.zookeeper:ZookeeperBackend", "zookeeper"
        ),
        "redis": BackendRef("keel.coordination.backends.redis:RedisBackend", "redis"),
        "rediss": BackendRef("keel.coordination.backends.redis:RedisBackend", "redis"),
        "redis+sentinel": BackendRef("keel.coordination.backends.redis:RedisBackend", "redis"),
        "rediss+sentinel": BackendRef("keel.coordination.backends.redis:RedisBackend", "redis"),
    },
    "store": {
        "sqlite": BackendRef("keel.hub.stores.sqlite:SQLiteStore"),
        "postgresql": BackendRef("keel.hub.stores.postgres:PostgresStore", "postgres"),
        "postgres": BackendRef("keel.hub.stores.postgres:PostgresStore", "postgres"),
    },
}

_ENTRY_POINT_GROUPS = {
    "transport": "keel.transports",
    "coordination": "keel.coordination",
    "store": "keel.hub.stores",
}


@dataclass(frozen=True)
class Host:
    """One endpoint of a URL; a multi-host URL lists several (``h1:5672,h2:5673``)."""

    host: str
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def address(self, default_port: int) -> str:
        """``host:port`` (``[v6]:port``), for connecting and for messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port or default_port}"

    def __repr__(self) -> str:
        secret = ", password='***'" if self.password is not None else ""
        return f"Host({self.host!r}, {self.port!r}, username={self.username!r}{secret})"


# Query options whose value is a secret: masked by `URL.redacted`.
_SECRET_OPTIONS = ("password", "secret", "token", "passphrase")


@dataclass(frozen=True)
class URL:
    """A parsed backend URL: ``scheme://user:password@host:port/path?option=value``.

    The authority may list several endpoints separated by commas, each with its own
    credentials (oslo.messaging's form, ``rabbit://u:p@h1:5672,u:p@h2:5673/``) or sharing the
    first one's (``etcd://u:p@h1:2379,h2:2379``); `hosts` holds them in order and ``host``,
    ``port``, ``username``, ``password`` are the first one's. Its ``repr`` (and ``str``) is
    the redacted URL: a URL logged or shown in a traceback never shows a password.
    """

    raw: str = field(repr=False)
    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    path: str = ""
    options: dict[str, str] = field(default_factory=dict, repr=False)
    hosts: tuple[Host, ...] = ()

    def __repr__(self) -> str:
        return f"URL({self.redacted()!r})"

    def redacted(self) -> str:
        """The URL with every password (in each endpoint and in secret options) masked, for
        logs, error messages and metric labels."""
        return redact(self.raw)

    def endpoints(self, default_port: int) -> list[str]:
        """Every endpoint as ``host:port``, in the URL's order (127.0.0.1 if none is given)."""
        if not self.hosts:
            return [Host("127.0.0.1").address(default_port)]
        return [h.address(default_port) for h in self.hosts]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes "²" and "٣"
_HOSTNAME = re.compile(r"[\w.\-]+")  # letters (IDN too), digits, dots, dashes, underscores
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[\w.\-]+)?")


def redact(raw: str) -> str:
    """Mask the passwords of a URL string (every endpoint's, and secret query options), and
    control characters (no log injection through a URL).

    A URL whose user info cannot be told from its host (a password holding an unencoded
    ``/``, ``?``, ``#``, ``,`` or ``@``, which `parse` refuses) is masked from the scheme to its
    last ``@``: what a malformed URL shows is never part of its password."""
    raw = _CONTROL.sub("?", raw)
    scheme, sep, rest = raw.partition("://")
    if not sep:
        cut = raw.rfind("@")
        return raw if cut == -1 else "***" + raw[cut:]
    authority, tail = _split_authority(rest)
    if _ambiguity(authority, tail) is not None:
        cut = rest.rfind("@")
        return f"{scheme}://{_mask_query(rest if cut == -1 else '***' + rest[cut:])}"
    items = []
    for item in authority.split(","):
        userinfo, at, hostport = item.rpartition("@")
        if at and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        items.append(f"{userinfo}{at}{hostport}")
    return f"{scheme}://{','.join(items)}{_mask_query(tail)}"


def _mask_query(text: str) -> str:
    path, qmark, query = text.partition("?")
    if not qmark:
        return text
    pairs = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        secret = eq and any(word in name.lower() for word in _SECRET_OPTIONS)
        pairs.append(f"{name}=***" if secret else pair)
    return f"{path}?{'&'.join(pairs)}"


def _split_authority(rest: str) -> tuple[str, str]:
    """``user:pass@h1,h2/path?q`` -> (``user:pass@h1,h2``, ``/path?q``). A password may hold
    ``/``, ``?``, ``#``, ``,`` or ``@`` only percent-encoded, as in any URL."""
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1:
            cut = min(cut, at)
    return rest[:cut], rest[cut:]


def _ambiguity(authority: str, tail: str) -> str | None:
    """Why the user info of a URL cannot be told apart from the rest, or None. With an
    authority, an unencoded ``@`` belongs in it only, a ``#`` nowhere, and endpoints with
    credentials come before those without (``u:p@h1,h2``): anything else is a password
    holding an unencoded ``/``, ``?``, ``#`` or ``,``, or a mistyped URL."""
    if not authority:
        return None
    if "#" in tail:
        return "'#' (a backend URL has no fragment: percent-encode it as %23)"
    if "@" in tail:
        return (
            "'@' after the host (a user or password holding an unencoded '/' or '?', or an "
            "'@' in a path or option: percent-encode them as %2F, %3F, %40)"
        )
    with_user = ["@" in item for item in authority.split(",")]
    if any(not has and later for has, later in itertools.pairwise(with_user)):
        return (
            "an endpoint without credentials before one with them (a password holding an "
            "unencoded ',': percent-encode it as %2C; or give the credentials first)"
        )
    return None


def _host(item: str, url: str) -> Host:
    userinfo, at, hostport = item.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")) or not _IPV6.fullmatch(host):
            raise ConfigError(f"bad IPv6 address in backend URL {redact(url)!r}")
        port_text = after[1:] if after else None
    else:
        host, colon, port_text = hostport.partition(":")
        if not colon:
            port_text = None
    port = None
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise ConfigError(
                f"bad port in backend URL {redact(url)!r}: {port_text!r} is not 1..65535"
            )
        port = int(port_text)
    if not host:
        raise ConfigError(f"empty host in backend URL {redact(url)!r}")
    host = unquote(host)
    if not hostport.startswith("[") and not _HOSTNAME.fullmatch(host):
        raise ConfigError(
            f"bad host in backend URL {redact(url)!r}: {_CONTROL.sub('?', host)!r} is not a "
            "host name or address (an IPv6 address goes in brackets: [::1]:5672)"
        )
    return Host(host, port, username, password)


def parse(url: str) -> URL:
    """Parse a backend URL. Raises `ConfigError` on one that cannot be a URL, or whose
    passwords could be misread (see `redact`); the message never shows a password."""
    if "://" not in url:
        raise ConfigError(
            f"{redact(url)!r} is not a backend URL; expected scheme://..., e.g. memory:// or "
            "rabbit://user:pass@127.0.0.1:5672/"
        )
    if _CONTROL.search(url):
        raise ConfigError(f"backend URL {redact(url)!r} holds a control character")
    scheme, _, rest = url.partition("://")
    authority, tail = _split_authority(rest)
    ambiguity = _ambiguity(authority, tail)
    if ambiguity is not None:
        raise ConfigError(f"backend URL {redact(url)!r} cannot be read: {ambiguity}")
    hosts: list[Host] = []
    if authority:
        hosts = [_host(item, url) for item in authority.split(",")]
        first = hosts[0]
        # Endpoints without credentials of their own share the first endpoint's.
        hosts = [
            h if h.username is not None else Host(h.host, h.port, first.username, first.password)
            for h in hosts
        ]
    parts = urlsplit("x://" + tail) if tail else urlsplit("x://")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in options:
            raise ConfigError(f"option {name!r} is given twice in {redact(url)!r}")
        options[name] = value
    head = hosts[0] if hosts else None
    return URL(
        raw=url,
        scheme=scheme.lower(),
        host=head.host if head else None,
        port=head.port if head else None,
        username=head.username if head else None,
        password=head.password if head else None,
        path=unquote(parts.path),
        options=options,
        hosts=tuple(hosts),
    )


def check_options(url: URL, known: Iterable[str], given: Iterable[str] = ()) -> None:
    """Refuse options a backend does not know (``known``, its `URL_OPTIONS`), from the URL
    and from ``given`` keywords: a mistyped option (``cafile=``, ``tsl=true``) must fail, not
    leave TLS off or a timeout at its default without a word."""
    allowed = set(known)
    unknown = sorted({*url.options, *given} - allowed)
    if unknown:
        raise ConfigError(
            f"{url.scheme}:// does not know the option{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(n) for n in unknown)} (in {url.redacted()}); it knows: "
            f"{', '.join(sorted(allowed)) or 'none'}"
        )


def schemes(kind: str) -> list[str]:
    """The schemes known for a kind of backend, built-in and from entry points."""
    known = set(_BUILTIN.get(kind, {}))
    group = _ENTRY_POINT_GROUPS.get(kind)
    if group:
        known.update(ep.name for ep in entry_points(group=group))
    return sorted(known)


def resolve(kind: str, url: str) -> tuple[Any, URL]:
    """Return (backend class, parsed URL) for a URL of the given kind."""
    parsed = parse(url)
    ref = _BUILTIN.get(kind, {}).get(parsed.scheme)
    if ref is None:
        group = _ENTRY_POINT_GROUPS.get(kind)
        for ep in entry_points(group=group) if group else ():
            if ep.name == parsed.scheme:
                return ep.load(), parsed
        raise UnknownScheme(
            f"no {kind} backend handles {parsed.scheme}:// (from {parsed.redacted()}); "
            f"known schemes: {', '.join(schemes(kind)) or 'none'}",
            scheme=parsed.scheme,
        )
    module_name, _, attr = ref.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if ref.extra is None or not _is_missing_dependency(exc, module_name):
            raise
        raise MissingExtra(
            f"the {parsed.scheme}:// {kind} needs the {exc.name!r} package: "
            f"pip install 'keel[{ref.extra}]'",
            extra=ref.extra,
            scheme=parsed.scheme,
        ) from exc
    return getattr(module, attr), parsed


def _is_missing_dependency(exc: ImportError, module_name: str) -> bool:
    # Only a missing third-party package means "install the extra"; a bug inside our own
    # backend module must surface as itself.
    return exc.name is not None and not exc.name.startswith("keel")


def from_env(name: str, default: str) -> str:
    """A setting from ``KEEL_<NAME>`` (e.g. KEEL_TRANSPORT_URL), else the default."""
    return os.environ.get(f"KEEL_{name.upper()}", default)
