"""Backend URLs resolved to backend classes by scheme, imported lazily.

The core never imports a backend by name: it asks this module. A missing client library is a
`MissingExtra` naming the pip extra; an unknown scheme is an `UnknownScheme` listing the known
ones. Third-party backends register through the entry point groups ``keel.transports``,
``keel.coordination`` and ``keel.hub.stores`` (value ``module:Class``).
"""

from __future__ import annotations

import importlib
import os
import re
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
    password: str | None = None

    def address(self, default_port: int) -> str:
        """``host:port`` (``[v6]:port``), for connecting and for messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port or default_port}"


# Query options whose value is a secret: masked by `URL.redacted`.
_SECRET_OPTIONS = ("password", "secret", "token", "passphrase")


@dataclass(frozen=True)
class URL:
    """A parsed backend URL: ``scheme://user:password@host:port/path?option=value``.

    The authority may list several endpoints separated by commas, each with its own
    credentials (oslo.messaging's form, ``rabbit://u:p@h1:5672,u:p@h2:5673/``) or sharing the
    first one's (``etcd://u:p@h1:2379,h2:2379``); `hosts` holds them in order and ``host``,
    ``port``, ``username``, ``password`` are the first one's.
    """

    raw: str
    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    path: str = ""
    options: dict[str, str] = field(default_factory=dict)
    hosts: tuple[Host, ...] = ()

    def redacted(self) -> str:
        """The URL with every password (in each endpoint and in secret options) masked, for
        logs, error messages and metric labels."""
        return redact(self.raw)

    def endpoints(self, default_port: int) -> list[str]:
        """Every endpoint as ``host:port``, in the URL's order (127.0.0.1 if none is given)."""
        if not self.hosts:
            return [Host("127.0.0.1").address(default_port)]
        return [h.address(default_port) for h in self.hosts]


def redact(raw: str) -> str:
    """Mask the passwords of a URL string (every endpoint's, and secret query options)."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        return raw
    authority, tail = _split_authority(rest)
    items = []
    for item in authority.split(","):
        userinfo, at, hostport = item.rpartition("@")
        if at and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        items.append(f"{userinfo}{at}{hostport}")
    path, qmark, query = tail.partition("?")
    if qmark:
        pairs = []
        for pair in query.split("&"):
            name, eq, _value = pair.partition("=")
            secret = eq and any(word in name.lower() for word in _SECRET_OPTIONS)
            pairs.append(f"{name}=***" if secret else pair)
        query = "&".join(pairs)
    return f"{scheme}://{','.join(items)}{path}{qmark}{query}"


def _split_authority(rest: str) -> tuple[str, str]:
    """``user:pass@h1,h2/path?q`` -> (``user:pass@h1,h2``, ``/path?q``). A password may hold
    ``/`` or ``?`` only percent-encoded, as in any URL."""
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1:
            cut = min(cut, at)
    return rest[:cut], rest[cut:]


_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes "²" and "٣"


def _host(item: str, url: str) -> Host:
    userinfo, at, hostport = item.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if hostport.startswith("["):
        host, bracket, after = hostport[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
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
    return Host(unquote(host), port, username, password)


def parse(url: str) -> URL:
    """Parse a backend URL. Raises `ConfigError` on one that cannot be a URL."""
    if "://" not in url:
        raise ConfigError(
            f"{redact(url)!r} is not a backend URL; expected scheme://..., e.g. memory:// or "
            "rabbit://user:pass@127.0.0.1:5672/"
        )
    scheme, _, rest = url.partition("://")
    authority, tail = _split_authority(rest)
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
    for name, value in parse_qsl(parts.query):
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
