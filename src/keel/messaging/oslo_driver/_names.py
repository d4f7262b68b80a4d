"""oslo.messaging addresses and transport URLs as Keel names: pure functions, no I/O.

* ``keel+<scheme>://...`` is oslo's transport URL with Keel's backend after the ``+``
  (oslo.messaging loads the driver named before it, ``keel``); the rest of the URL is handed
  to Keel unchanged, less the options that are the driver's own (`DriverOptions`).
* An oslo RPC address (exchange, topic, server) becomes the Keel topic
  ``<exchange>:<topic>`` and server ``<server>``: the exchange (a Target's, else the
  service's ``control_exchange``) keeps nova's ``compute`` apart from another project's.
  Names pass through as they are except characters outside ``A-Za-z0-9_.@-`` (and a first
  character that is not a letter, digit or ``_``), which become ``+XX`` per UTF-8 byte, so
  the mapping is injective and a native Keel service names the same queue by writing
  ``Target("nova:compute", server="host@lvm")``.
* Notifications keep oslo's names (``<topic>.<priority>``, pool queues) so that on RabbitMQ
  they share queues and exchanges with oslo's own rabbit driver; on the other transports,
  which have no exchanges, the subject is ``<exchange>:<topic>.<priority>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from keel.errors import ConfigError

PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@-")
_FIRST = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_MARK = "_+_"  # starts an escaped name whose first character needed escaping; '_' is not hex
RABBIT_SCHEMES = frozenset({"rabbit", "amqp"})


def escape(name: str) -> str:
    """An oslo name as a Keel name (injective; plain names unchanged)."""
    if name and all(c in PLAIN for c in name) and name[0] in _FIRST:
        return name
    out = "".join(c if c in PLAIN else "".join(f"+{b:02X}" for b in c.encode()) for c in name)
    return out if out and out[0] in _FIRST else _MARK + out


def rpc_topic(exchange: str, topic: str) -> str:
    return f"{escape(exchange)}:{escape(topic)}"


def notify_subject(scheme: str, exchange: str, topic_priority: str) -> str:
    """Where a notification for ``<topic>.<priority>`` of ``exchange`` is published."""
    if scheme in RABBIT_SCHEMES:
        return topic_priority  # the exchange is the transport's (see `DriverOptions`)
    return f"{escape(exchange)}:{topic_priority}"


def parse_version(version: Any) -> str:
    """oslo's version ("1", "2.3", None) as Keel's MAJOR.MINOR."""
    if version is None:
        return "1.0"
    text = str(version)
    parts = text.split(".")
    if len(parts) == 1:
        parts.append("0")
    if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ConfigError(f"RPC version {text!r} is not MAJOR.MINOR (e.g. 1.0)")
    return ".".join(parts)


# Options of the driver itself, read from the transport URL's query and not passed on.
DRIVER_OPTIONS = ("drain_timeout", "legacy")


@dataclass(frozen=True)
class DriverOptions:
    """What the driver reads from an oslo TransportURL.

    ``drain_timeout`` (seconds, default 60): how long an RPC server's ``stop()`` lets the
    requests it already runs finish before cancelling them (their callers then get
    ``ServerDraining``; oslo's own drivers wait without a bound). ``legacy`` (``send`` or
    ``listen``, RabbitMQ only): speak oslo's rabbit RPC too, while a cloud moves (`_legacy`).
    """

    scheme: str  # Keel's: rabbit, nats, redis, memory, ...
    url: str  # the Keel transport URL
    drain_timeout: float = 60.0
    legacy: str | None = None

    @classmethod
    def from_oslo(cls, transport: str, text: str, query: dict[str, str]) -> DriverOptions:
        """``transport`` is TransportURL.transport (``keel+rabbit``); ``text`` its str()."""
        head, plus, scheme = transport.partition("+")
        if not plus or not scheme:
            raise ConfigError(
                f"transport URL {head}:// names no Keel backend: write keel+rabbit://, "
                "keel+nats://, keel+redis:// or keel+memory://"
            )
        rest = text.split("://", 1)[1]
        path, _, _ = rest.partition("?")
        keel_query = {k: v for k, v in query.items() if k not in DRIVER_OPTIONS}
        url = f"{scheme}://{path}" + (f"?{urlencode(keel_query)}" if keel_query else "")
        try:
            drain = float(query.get("drain_timeout", 60.0))
        except ValueError:
            raise ConfigError(f"drain_timeout={query['drain_timeout']!r} is not seconds") from None
        if not 0 < drain < float("inf"):
            raise ConfigError(f"drain_timeout={drain!r}: give a positive number of seconds")
        return cls(scheme.lower(), url, drain, query.get("legacy") or None)

    def with_exchange(self, exchange: str, *, durable: bool) -> str:
        """The RabbitMQ URL whose topic exchange is oslo's ``exchange`` (notifications)."""
        joiner = "&" if "?" in self.url else "?"
        extra = urlencode({"exchange": exchange, "exchange_durable": str(durable).lower()})
        return self.url + joiner + extra
