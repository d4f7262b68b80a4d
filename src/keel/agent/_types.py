"""Results the client returns for both agents (Keel's and qemu-guest-agent), the interface
each agent backend implements, and `expect`, which checks an agent's answer. Pure data and
functions, no I/O; `expect` raises `ProtocolError` only."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec

from keel.errors import ProtocolError

T = TypeVar("T")
OutputCallback = Callable[[int, bytes], None]
"""Called with (stream, data) as exec output arrives: stream 0 is stdout, 1 is stderr."""


@dataclass(frozen=True)
class ExecResult:
    """How a program ended. ``stdout``/``stderr`` are empty when output went to a callback."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    sha256: str


class Backend(Protocol):
    """One agent dialect. `AgentClient` gives operators one API over every backend."""

    kind: str

    @property
    def closed(self) -> bool:
        """The channel broke; `AgentClient` opens a new one for the next call."""
        ...

    async def ping(self, timeout: float) -> None: ...

    async def info(self, timeout: float) -> dict[str, Any]: ...

    async def exec(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        cwd: str | None,
        stdin: bytes | None,
        timeout: float,
        on_output: OutputCallback | None,
        max_output: int,
    ) -> ExecResult: ...

    async def put_file(
        self, path: str, data: bytes | Path, *, mode: int | None, timeout: float
    ) -> FileInfo: ...

    async def get_file(self, path: str, *, max_size: int, timeout: float) -> bytes: ...

    async def set_password(
        self, username: str, password: str, *, crypted: bool, timeout: float
    ) -> None: ...

    async def add_ssh_key(self, username: str, key: str, *, timeout: float) -> None: ...

    async def call(
        self, plugin: str, command: str, args: dict[str, Any], timeout: float
    ) -> Any: ...

    async def resync(self) -> None: ...

    async def close(self) -> None: ...


def expect(value: Any, kind: type[T], command: str) -> T:
    """The agent's result as ``kind``; anything else is the agent breaking the protocol."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"{command}: the agent's result is malformed: {exc}") from None
