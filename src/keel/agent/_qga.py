"""qemu-guest-agent's JSON protocol, spoken by the same client as Keel's agent.

qga reads one JSON object per command and writes one JSON line per reply. To get back to a
clean stream (after a reconnect, a timeout or garbage) the client sends ``0xFF`` (which
resets qga's JSON parser) and ``guest-sync-delimited`` with a random id; qga answers with
``0xFF`` then ``{"return": id}``, and everything before that is discarded. Binary data
travels base64 in qga (its format, not ours).

Failure semantics: every command has a deadline (`AgentTimeout`); a reply line longer than
``max_line`` is a `FrameTooLarge`; a reply that is not JSON, nests deeper than `MAX_DEPTH`,
lacks what the command returns, or whose ``id`` is not the request's, is a `ProtocolError`:
nothing but `keel.errors.AgentError` leaves this module. After any of these the connection is
marked dirty and the next command resyncs first; a command that times out with half a line
received closes the channel (the next command opens a new one). qga errors map by class:
``CommandNotFound`` is `UnknownCommand`, except that qemu-ga 7.2 reports a command disabled
with ``--block-rpcs`` as ``CommandNotFound`` "... has been disabled", which is `CommandDenied`
like ``CommandDisabled``; anything else is `CommandFailed`. Commands qga lacks (services,
health, exec ``cwd``, file ``mode``) raise `UnknownCommand` before anything is sent. Lines
being received count against the process's budget for partial frames (`keel.agent._budget`).
qga writes files in place: ``put_file`` is not atomic there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import msgspec

from keel.agent._budget import CLIENT_BUDGET, Budget, Holding
from keel.agent._channel import Channel
from keel.agent._types import ExecResult, FileInfo, OutputCallback, expect
from keel.errors import (
    AgentTimeout,
    AgentUnavailable,
    CommandDenied,
    CommandFailed,
    FrameTooLarge,
    ProtocolError,
    StreamLimitExceeded,
    UnknownCommand,
)

CHUNK = 1024 * 1024
DEFAULT_MAX_LINE = 16 * 1024 * 1024
MAX_DEPTH = 64
_JSON_TOKENS = re.compile(rb'["\\\[\]{}]')


def too_deep(line: bytes, limit: int) -> bool:
    """True if the JSON text nests more than ``limit`` arrays and objects. Counting brackets
    is enough for almost every reply (base64 has none); only then are strings skipped."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False
    depth = 0
    in_string = False
    skip_to = 0
    for match in _JSON_TOKENS.finditer(line):
        at = match.start()
        if at < skip_to:
            continue  # the character after a backslash
        token = line[at]
        if in_string:
            if token == 0x5C:  # backslash
                skip_to = at + 2
            elif token == 0x22:
                in_string = False
        elif token == 0x22:
            in_string = True
        elif token in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif token in (0x5D, 0x7D):
            depth -= 1
    return False


def parse(line: bytes, what: str) -> Any:
    """One reply line as JSON; `ProtocolError` for anything else."""
    if too_deep(line, MAX_DEPTH):
        raise ProtocolError(f"{what}: qemu-guest-agent sent JSON nested over {MAX_DEPTH} deep")
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # ValueError: also bad UTF-8, 4300+ digit integers
        raise ProtocolError(f"{what}: qemu-guest-agent sent a line that is not JSON") from None


class _ExecStarted(msgspec.Struct):
    pid: int


class _ExecStatus(msgspec.Struct, rename="kebab"):
    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    out_data: str = ""
    err_data: str = ""


class _FileRead(msgspec.Struct, rename="kebab"):
    buf_b64: str = ""
    eof: bool = False


class _Info(msgspec.Struct):
    version: str = "?"


class _HostName(msgspec.Struct, rename="kebab"):
    host_name: str = ""


def b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error
        raise ProtocolError(f"{what}: qemu-guest-agent sent bad base64") from None


def _unsupported(what: str) -> UnknownCommand:
    return UnknownCommand(f"qemu-guest-agent has no {what}", command=what)


class QgaBackend:
    """A qemu-guest-agent on one channel (its unix socket or virtio-serial port)."""

    kind = "qga"

    def __init__(
        self, channel: Channel, *, max_line: int = DEFAULT_MAX_LINE, budget: Budget = CLIENT_BUDGET
    ) -> None:
        self.channel = channel
        self.max_line = max_line
        self._buf = bytearray()
        self._holding = Holding(budget)
        self._lock = asyncio.Lock()
        self._dirty = True
        self._seq = int.from_bytes(os.urandom(3), "big")
        self.closed = False

    # --- transport ------------------------------------------------------------------------

    async def _fill(self) -> None:
        self._holding.set(len(self._buf))
        await self._holding.room(None)  # the command's deadline bounds the wait
        data = await self.channel.read(CHUNK)
        if not data:
            raise AgentUnavailable("qemu-guest-agent closed the channel")
        self._buf += data
        self._holding.set(len(self._buf))

    async def _line(self) -> bytes:
        start = 0
        while True:
            at = self._buf.find(b"\n", start)
            if at >= 0:
                line = bytes(self._buf[:at])
                del self._buf[: at + 1]
                return line
            if len(self._buf) > self.max_line:
                size = len(self._buf)
                self._buf.clear()
                self._holding.set(0)
                raise FrameTooLarge(
                    f"qemu-guest-agent sent a line over {self.max_line} bytes",
                    size=size,
                    limit=self.max_line,
                )
            start = len(self._buf)
            await self._fill()

    async def _sync(self, deadline: float) -> None:
        nonce = int.from_bytes(os.urandom(4), "big")
        request = {"execute": "guest-sync-delimited", "arguments": {"id": nonce}}
        await self.channel.write(b"\xff" + json.dumps(request).encode() + b"\n")
        while time.monotonic() < deadline:
            while (at := self._buf.find(b"\xff")) < 0:
                self._buf.clear()  # all of it predates the delimiter
                await self._fill()
            del self._buf[: at + 1]
            try:
                reply = parse(await self._line(), "guest-sync-delimited")
            except ProtocolError:
                continue
            if isinstance(reply, dict) and reply.get("return") == nonce:
                self._dirty = False
                return
        raise AgentTimeout("qemu-guest-agent did not answer guest-sync-delimited")

    async def execute(self, command: str, args: dict[str, Any] | None, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    if self._dirty:
                        await self._sync(deadline)
                    return await self._roundtrip(command, args)
            except TimeoutError:
                self._dirty = True
                stalled = bool(self._buf)
                if stalled:
                    # Half a line that may never end: open a new channel for the next command.
                    await self._close_broken()
                raise AgentTimeout(
                    f"{command}: no answer from qemu-guest-agent within {timeout}s"
                    + (" (it stalled mid-line; channel closed)" if stalled else ""),
                    command=command,
                    timeout=timeout,
                ) from None
            except (ProtocolError, asyncio.CancelledError):
                self._dirty = True
                raise
            except AgentUnavailable:
                await self._close_broken()
                raise

    async def _close_broken(self) -> None:
        self.closed = True
        self._buf.clear()
        self._holding.release()
        await self.channel.close()

    async def _roundtrip(self, command: str, args: dict[str, Any] | None) -> Any:
        self._seq += 1
        request: dict[str, Any] = {"execute": command, "id": self._seq}
        if args:
            request["arguments"] = args
        await self.channel.write(json.dumps(request).encode() + b"\n")
        reply = parse(await self._line(), command)
        if not isinstance(reply, dict):
            raise ProtocolError(f"{command}: qemu-guest-agent sent {type(reply).__name__}")
        if reply.get("id") != self._seq:
            raise ProtocolError(
                f"{command}: reply for id {reply.get('id')!r}, expected {self._seq}",
                request_id=reply.get("id"),
            )
        if "error" in reply:
            err = reply["error"] if isinstance(reply["error"], dict) else {}
            cls, desc = str(err.get("class", "")), str(err.get("desc", ""))
            if cls == "CommandDisabled" or (cls == "CommandNotFound" and "disabled" in desc):
                # qemu-ga 7.2 reports a command blocked by --block-rpcs as CommandNotFound
                # "Command X has been disabled"; newer ones say CommandDisabled.
                raise CommandDenied(f"{command}: {desc}", command=command)
            if cls == "CommandNotFound":
                raise UnknownCommand(f"{command}: {desc}", command=command)
            raise CommandFailed(f"{command}: {desc}", command=command, code=cls, detail=desc)
        return reply.get("return")

    # --- the common API -------------------------------------------------------------------

    async def ping(self, timeout: float) -> None:
        await self.execute("guest-ping", None, timeout)

    async def info(self, timeout: float) -> dict[str, Any]:
        info = expect(await self.execute("guest-info", None, timeout), _Info, "guest-info")
        osinfo = expect(
            await self.execute("guest-get-osinfo", None, timeout), dict[str, Any], "osinfo"
        )
        host = expect(
            await self.execute("guest-get-host-name", None, timeout), _HostName, "host-name"
        )
        return {
            "os": {
                "name": str(osinfo.get("name", "")),
                "id": str(osinfo.get("id", "")),
                "version": str(osinfo.get("version-id", "")),
                "pretty_name": str(osinfo.get("pretty-name", "")),
                "kernel": str(osinfo.get("kernel-release", "")),
                "machine": str(osinfo.get("machine", "")),
            },
            "hostname": host.host_name,
            "agent_version": f"qemu-ga {info.version}",
            "agent_uptime": None,
            "uptime": None,
        }

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
    ) -> ExecResult:
        if cwd is not None:
            raise _unsupported("exec cwd")
        if not argv:
            raise CommandFailed("argv is empty")
        deadline = time.monotonic() + timeout
        args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        if env:
            args["env"] = [f"{k}={v}" for k, v in env.items()]
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        pid = expect(await self.execute("guest-exec", args, timeout), _ExecStarted, "exec").pid
        pause = 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout(f"exec {argv[0]}: still running after {timeout}s")
            reply = await self.execute("guest-exec-status", {"pid": pid}, left)
            status = expect(reply, _ExecStatus, "guest-exec-status")
            if status.exited:
                break
            # qga has no exit notification: poll, quickly at first.
            await asyncio.sleep(pause)
            pause = min(pause * 2 or 0.0005, 0.02)
        out = b64decode(status.out_data, "guest-exec-status")
        err = b64decode(status.err_data, "guest-exec-status")
        if len(out) + len(err) > max_output:
            raise StreamLimitExceeded(f"exec output over {max_output} bytes", limit=max_output)
        if on_output is not None:
            if out:
                on_output(0, out)
            if err:
                on_output(1, err)
            out = err = b""
        return ExecResult(
            exit_code=status.exitcode if status.signal is None else None,
            signal=status.signal,
            stdout=out,
            stderr=err,
        )

    async def put_file(
        self, path: str, data: bytes | Path, *, mode: int | None, timeout: float
    ) -> FileInfo:
        if mode is not None:
            raise _unsupported("file mode")
        deadline = time.monotonic() + timeout
        payload = await asyncio.to_thread(data.read_bytes) if isinstance(data, Path) else data
        opened = await self.execute("guest-file-open", {"path": path, "mode": "wb"}, timeout)
        handle = expect(opened, int, "guest-file-open")
        try:
            for start in range(0, len(payload), CHUNK):
                piece = payload[start : start + CHUNK]
                buf = base64.b64encode(piece).decode()
                await self.execute(
                    "guest-file-write",
                    {"handle": handle, "buf-b64": buf},
                    max(deadline - time.monotonic(), 0.001),
                )
        finally:
            await self.execute("guest-file-close", {"handle": handle}, 5.0)
        return FileInfo(path, len(payload), hashlib.sha256(payload).hexdigest())

    async def get_file(self, path: str, *, max_size: int, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        opened = await self.execute("guest-file-open", {"path": path, "mode": "rb"}, timeout)
        handle = expect(opened, int, "guest-file-open")
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                reply = await self.execute(
                    "guest-file-read",
                    {"handle": handle, "count": CHUNK},
                    max(deadline - time.monotonic(), 0.001),
                )
                read = expect(reply, _FileRead, "guest-file-read")
                piece = b64decode(read.buf_b64, "guest-file-read")
                size += len(piece)
                if size > max_size:
                    raise StreamLimitExceeded(f"{path} is over {max_size} bytes", limit=max_size)
                parts.append(piece)
                if read.eof or not piece:
                    break
        finally:
            await self.execute("guest-file-close", {"handle": handle}, 5.0)
        return b"".join(parts)

    async def set_password(
        self, username: str, password: str, *, crypted: bool, timeout: float
    ) -> None:
        args = {
            "username": username,
            "password": base64.b64encode(password.encode()).decode(),
            "crypted": crypted,
        }
        await self.execute("guest-set-user-password", args, timeout)

    async def add_ssh_key(self, username: str, key: str, *, timeout: float) -> None:
        args = {"username": username, "keys": [key.strip()], "reset": False}
        await self.execute("guest-ssh-add-authorized-keys", args, timeout)

    async def call(self, plugin: str, command: str, args: dict[str, Any], timeout: float) -> Any:
        if plugin != "qga":
            raise _unsupported(f"plugin {plugin}")
        return await self.execute(command, args, timeout)

    async def resync(self) -> None:
        async with self._lock:
            try:
                async with asyncio.timeout(5.0):
                    await self._sync(time.monotonic() + 5.0)
            except TimeoutError:
                self._dirty = True
                raise AgentTimeout("qemu-guest-agent did not answer guest-sync-delimited") from None

    async def close(self) -> None:
        self._holding.release()
        await self.channel.close()
