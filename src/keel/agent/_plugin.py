"""Agent plugins: a class with a name, a version and typed commands.

A command is an ``async`` method marked with `command`, taking a `CommandContext` and
keyword-only typed arguments. Its signature becomes a msgspec Struct, so arguments from the
wire are validated before the method runs. Third-party plugins register under the
``keel.agent.plugins`` entry point group; a plugin that fails to load is logged and left out,
never taking the agent down.

Failure semantics: a command raises `CommandFailed` (or any other `keel.errors.AgentError`)
for failures the controller should see; any other exception becomes a ``failed`` reply with
its message, never a traceback on the wire.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

from keel.errors import BadArguments

ENTRY_POINT_GROUP = "keel.agent.plugins"
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class CommandContext(Protocol):
    """What a running command can do besides returning a value."""

    peer: str
    chunk_size: int

    async def send(self, data: bytes | bytearray | memoryview, stream: int = 0) -> None:
        """Stream a chunk to the controller (waits for its credit). The data is copied into
        the frame before this returns, so a caller may reuse its buffer."""

    def receive(self) -> AsyncIterator[bytes]:
        """The chunks the controller uploads for this request, until it ends the upload."""


class Plugin:
    """Base class for agent plugins. ``config`` is the plugin's table of the agent config."""

    name: ClassVar[str]
    version: ClassVar[str]
    # Commands that finish without waiting on anything (no I/O, no subprocess): the agent
    # runs them in its read loop, saving a task switch on the hot path (ping).
    inline: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config


def command(fn: F) -> F:
    """Mark an async method of a `Plugin` as a command the controller may call."""
    fn._keel_command = True  # type: ignore[attr-defined]
    return fn


@dataclass(frozen=True)
class Command:
    plugin: Plugin
    name: str
    args_type: type[msgspec.Struct]
    fn: Callable[..., Awaitable[Any]]
    inline: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.plugin.name}.{self.name}"

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """Validate wire arguments against the signature; raise `BadArguments`."""
        try:
            value = msgspec.convert(args, self.args_type, strict=True)
        except msgspec.ValidationError as exc:
            raise BadArguments(f"{self.full_name}: {exc}", command=self.full_name) from None
        return {f: getattr(value, f) for f in value.__struct_fields__}


def commands_of(plugin: Plugin) -> dict[str, Command]:
    found: dict[str, Command] = {}
    for attr in dir(type(plugin)):
        fn = getattr(plugin, attr)
        if not getattr(fn, "_keel_command", False):
            continue
        hints = typing.get_type_hints(fn)
        fields: list[tuple[str, Any, Any] | tuple[str, Any]] = []
        for param in list(inspect.signature(fn).parameters.values())[1:]:
            kind = hints.get(param.name, Any)
            if param.default is inspect.Parameter.empty:
                fields.append((param.name, kind))
            else:
                fields.append((param.name, kind, param.default))
        args_type = msgspec.defstruct(
            f"{plugin.name}.{attr}", fields, kw_only=True, forbid_unknown_fields=True
        )
        found[attr] = Command(plugin, attr, args_type, fn, attr in plugin.inline)
    return found


def load_plugins(
    config: dict[str, dict[str, Any]], warn: Callable[[str, str], None]
) -> dict[str, Plugin]:
    """Instantiate every plugin registered under the entry point group."""
    plugins: dict[str, Plugin] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            warn(ep.name, f"{type(exc).__name__}: {exc}")
            continue
        if not (isinstance(cls, type) and issubclass(cls, Plugin)):
            warn(ep.name, f"{ep.value} is not a keel.agent.Plugin subclass")
            continue
        try:
            plugin = cls(config.get(cls.name, {}))
        except Exception as exc:
            warn(ep.name, f"{type(exc).__name__}: {exc}")
            continue
        plugins[plugin.name] = plugin
    return plugins
