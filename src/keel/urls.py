"""Backend URLs resolved to backend classes by scheme, imported lazily.

The core never imports a backend by name: it asks this module. A missing client library is a
`MissingExtra` naming the pip extra; an unknown scheme is an `UnknownScheme` listing the known
ones. Third-party backends register through the entry point groups ``keel.transports``,
``keel.coordination`` and ``keel.hub.stores`` (value ``module:Class``).
"""

from __future__ import annotations

import importlib
import os
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
        "nats": BackendRef("keel.messaging.transports.nats:NatsTransport", extra="nats"),
        "redis": BackendRef("keel.messaging.transports.redis:RedisTransport", extra="redis"),
    },
    "coordination": {
        "sqlite": BackendRef("keel.coordination.backends.sqlite:SqliteBackend"),
        "etcd": BackendRef("keel.coordination.backends.etcd:EtcdBackend", "etcd"),
        "zookeeper": BackendRef(
            "keel.coordination.backends.zookeeper:ZookeeperBackend", "zookeeper"
        ),
        "redis": BackendRef("keel.coordination.backends.redis:RedisBackend", "redis"),
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
class URL:
    """A parsed backend URL: ``scheme://user:password@host:port/path?option=value``."""

    raw: str
    scheme: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    path: str = ""
    options: dict[str, str] = field(default_factory=dict)

    def redacted(self) -> str:
        """The URL with its password masked, for logs and error messages."""
        if self.password is None:
            return self.raw
        return self.raw.replace(f":{self.password}@", ":***@", 1)


def parse(url: str) -> URL:
    """Parse a backend URL. Raises `ConfigError` on one that cannot be a URL."""
    if "://" not in url:
        raise ConfigError(
            f"{url!r} is not a backend URL; expected scheme://..., e.g. memory:// or "
            "rabbit://user:pass@127.0.0.1:5672/"
        )
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad port in backend URL {url!r}: {exc}") from None
    return URL(
        raw=url,
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        path=unquote(parts.path),
        options=dict(parse_qsl(parts.query)),
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
