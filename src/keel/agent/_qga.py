"""qemu-guest-agent's JSON protocol, spoken by the same client as Keel's agent.

qga reads one JSON object per command and writes one JSON line per reply. To get back to a
clean stream (after a reconnect, a timeout or garbage) the client sends ``0xFF`` (which
resets qga's JSON parser) and ``guest-sync-delimited`` with a random id; qga answers with
``0xFF`` then ``{"return": id}``, and everything before that is discarded. Binary data
travels base64 in qga (its format, not ours).

Failure semantics: every command has a deadline (`AgentTimeout`); a reply line longer than
``max_line`` is a `FrameTooLarge`; a reply that is not JSON, or whose ``id`` is not the
request's, is a `ProtocolError`. After any of these the connection is marked dirty and the
next command resyncs first. qga errors map by class: ``CommandNotFound`` is `UnknownCommand`,
``CommandDisabled`` is `CommandDenied`, anything else is `CommandFailed`. Commands qga lacks
(services, health, exec ``cwd``, file ``mode``) raise `UnknownCommand` before anything is sent.
qga writes files in place: ``put_file`` is not atomic there.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from keel.agent._channel import Channel
from keel.agent._types import ExecResult, FileInfo, OutputCallback
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


def _unsupported(what: str) -> UnknownCommand:
    return UnknownCommand(f"qemu-guest-agent has no {what}", command=what)


class QgaBackend:
    """A qemu-guest-agent on one channel (its unix socket or virtio-serial port)."""

    kind = "qga"

    def __init__(self, channel: Channel, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.channel = channel
        self.max_line = max_line
        self._buf = bytearray()
        self._lock = asyncio.Lock()
        self._dirty = True
        self._seq = int.from_bytes(os.urandom(3), "big")
        self.closed = False

    # --- transport ------------------------------------------------------------------------

    async def _fill(self) -> None:
        data = await self.channel.read(CHUNK)
        if not data:
            raise AgentUnavailable("qemu-guest-agent closed the channel")
        self._buf += data

    async def _line(self) -> bytes:
        start = 0
        while True:
            at = self._buf.find(b"\n", start)
            if at >= 0:
                line = bytes(self._buf[:at])
                del self._buf[: at + 1]
                return line
            if len(self._buf) > self.max_line:
                self._buf.clear()
                raise FrameTooLarge(
                    f"qemu-guest-agent sent a line over {self.max_line} bytes",
                    size=len(self._buf),
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
                reply = json.loads(await self._line())
            except ValueError:
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
                raise AgentTimeout(
                    f"{command}: no answer from qemu-guest-agent within {timeout}s",
                    command=command,
                    timeout=timeout,
                ) from None
            except (ProtocolError, asyncio.CancelledError):
                self._dirty = True
                raise
            except AgentUnavailable:
                self.closed = True
                raise

    async def _roundtrip(self, command: str, args: dict[str, Any] | None) -> Any:
        self._seq += 1
        request: dict[str, Any] = {"execute": command, "id": self._seq}
        if args:
            request["arguments"] = args
        await self.channel.write(json.dumps(request).encode() + b"\n")
        line = await self._line()
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProtocolError(
                f"{command}: qemu-guest-agent sent a line that is not JSON"
            ) from None
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
            if cls == "CommandNotFound":
                raise UnknownCommand(f"{command}: {desc}", command=command)
            if cls == "CommandDisabled":
                raise CommandDenied(f"{command}: {desc}", command=command)
            raise CommandFailed(f"{command}: {desc}", command=command, code=cls, detail=desc)
        return reply.get("return")

    # --- the common API -------------------------------------------------------------------

    async def ping(self, timeout: float) -> None:
        await self.execute("guest-ping", None, timeout)

    async def info(self, timeout: float) -> dict[str, Any]:
        info = await self.execute("guest-info", None, timeout)
        osinfo = await self.execute("guest-get-osinfo", None, timeout)
        host = await self.execute("guest-get-host-name", None, timeout)
        return {
            "os": {
                "name": osinfo.get("name", ""),
                "id": osinfo.get("id", ""),
                "version": osinfo.get("version-id", ""),
                "pretty_name": osinfo.get("pretty-name", ""),
                "kernel": osinfo.get("kernel-release", ""),
                "machine": osinfo.get("machine", ""),
            },
            "hostname": host.get("host-name", ""),
            "agent_version": f"qemu-ga {info.get('version', '?')}",
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
        pid = (await self.execute("guest-exec", args, timeout))["pid"]
        pause = 0.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentTimeout(f"exec {argv[0]}: still running after {timeout}s")
            status = await self.execute("guest-exec-status", {"pid": pid}, left)
            if status.get("exited"):
                break
            # qga has no exit notification: poll, quickly at first.
            await asyncio.sleep(pause)
            pause = min(pause * 2 or 0.0005, 0.02)
        out = base64.b64decode(status.get("out-data", ""))
        err = base64.b64decode(status.get("err-data", ""))
        if len(out) + len(err) > max_output:
            raise StreamLimitExceeded(f"exec output over {max_output} bytes", limit=max_output)
        if on_output is not None:
            if out:
                on_output(0, out)
            if err:
                on_output(1, err)
            out = err = b""
        signal = status.get("signal")
        return ExecResult(
            exit_code=status.get("exitcode") if signal is None else None,
            signal=signal,
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
        handle = await self.execute("guest-file-open", {"path": path, "mode": "wb"}, timeout)
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
        handle = await self.execute("guest-file-open", {"path": path, "mode": "rb"}, timeout)
        parts: list[bytes] = []
        size = 0
        try:
            while True:
                reply = await self.execute(
                    "guest-file-read",
                    {"handle": handle, "count": CHUNK},
                    max(deadline - time.monotonic(), 0.001),
                )
                piece = base64.b64decode(reply.get("buf-b64", ""))
                size += len(piece)
                if size > max_size:
                    raise StreamLimitExceeded(f"{path} is over {max_size} bytes", limit=max_size)
                parts.append(piece)
                if reply.get("eof") or not piece:
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
        await self.channel.close()
