"""Targets (where a message goes) and the queue and subject names derived from them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from keel.errors import ConfigError

# '@' and ':' because OpenStack names servers "host@backend" and the oslo.messaging driver
# joins exchange and topic with ':'; '+' for the driver's escapes of anything else. None of
# them is special in an AMQP queue name or routing key, a NATS subject or a Redis key
# (unlike '*', '#', '>', '%' and whitespace, which stay refused).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@:+-]{0,199}")
# ASCII digits only (``\d`` takes any Unicode digit) and few of them (int() of thousands of
# digits is slow, and past 4300 a ValueError): a version is data from the wire too.
_VERSION = re.compile(r"([0-9]{1,9})\.([0-9]{1,9})")


def parse_version(version: str) -> tuple[int, int]:
    match = _VERSION.fullmatch(version)
    if not match:
        raise ConfigError(f"interface version {version!r} is not of the form MAJOR.MINOR, e.g. 1.0")
    return int(match.group(1)), int(match.group(2))


def _check_name(kind: str, value: str) -> None:
    if not _NAME.fullmatch(value):  # fullmatch: '$' would let a trailing newline in
        raise ConfigError(
            f"{kind} {value!r} is not a valid name: use letters, digits, '_', '.', '-', "
            "'@', ':', '+' (at most 200, starting with a letter, digit or '_')"
        )


@dataclass(frozen=True, slots=True)
class Target:
    """Where RPC messages go: a topic, optionally one named server, a namespace, a version.

    On a server, ``server`` is the name it answers to (default: a unique name is made up).
    On an endpoint class, ``target = Target(namespace=..., version=...)`` declares the
    endpoint's namespace and interface version (its topic is ignored).
    """

    topic: str = ""
    server: str | None = None
    namespace: str | None = None
    version: str = "1.0"
    _parsed: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.topic:
            _check_name("topic", self.topic)
        if self.server is not None:
            _check_name("server", self.server)
        object.__setattr__(self, "_parsed", parse_version(self.version))

    @property
    def version_tuple(self) -> tuple[int, int]:
        return self._parsed

    def with_(self, **changes: str | None) -> Target:
        return replace(self, **changes)  # type: ignore[arg-type]


def rpc_queue(topic: str, server: str | None = None) -> str:
    return f"keel.rpc.{topic}" if server is None else f"keel.rpc.{topic}.server.{server}"


def fanout_subject(topic: str) -> str:
    return f"keel.fanout.{topic}"


def notify_subject(topic: str, priority: str) -> str:
    return f"{topic}.{priority}"


def notify_queue(topic: str, priority: str, pool: str | None) -> str:
    base = notify_subject(topic, priority)
    return base if pool is None else f"{base}.pool.{pool}"
