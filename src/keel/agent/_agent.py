"""The agent that runs in the guest: one session per channel, plugins, allow/deny, audit.

Failure semantics: the agent survives every bad frame. Garbage or an oversize length gets an
``Error`` frame with id 0 and the agent then drops bytes until the controller's sync token; an
undecodable or too deeply nested frame, an unknown, denied or badly-typed command, or a
repeated request id gets an ``Error`` frame naming it. A frame not whole ``frame_timeout``
seconds after its first byte is dropped the same way, so a controller that reconnects always
gets back to a clean stream. A sync token cancels every command of the session before the
answer is written, so no reply from before the sync follows it. Each command, allowed or
not, writes one audit line (who, what, when, result) as JSON to the audit log. A command's
deadline and the controller's cancel stop it (``exec`` kills its process); the end of a
channel cancels its commands and drops those it had read but not started.

One controller cannot harm another: partial frames of all sessions share one budget
(``max_buffered``; over it, a session assembling a large frame stops reading), a session runs
at most ``max_inflight`` commands (more are refused ``busy``), inline commands yield to other
sessions every few milliseconds, and the agent serves at most ``max_sessions`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import sys
import time
import tomllib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import keel
from keel.agent import _protocol as p
from keel.agent._budget import AGENT_LIMIT, Budget, Holding
from keel.agent._channel import Bytes, Channel
from keel.agent._plugin import Command, Plugin, commands_of, load_plugins
from keel.errors import (
    AgentBusy,
    AgentError,
    AgentTimeout,
    BadArguments,
    CommandDenied,
    CommandFailed,
    ConfigError,
    FrameTooLarge,
    IntegrityError,
    ProtocolError,
    StreamLimitExceeded,
    UnknownCommand,
)

log = logging.getLogger("keel.agent")
_REDACT = {"password", "stdin", "data", "key", "env"}


@dataclass
class AgentConfig:
    """The agent's config file (TOML). ``allow``/``deny`` are ``plugin.command`` globs; deny
    wins. Plugin tables (``[plugins.files]``) go to that plugin."""

    instance_id: str = ""
    allow: list[str] = field(default_factory=lambda: ["*"])
    deny: list[str] = field(default_factory=list)
    audit_log: str = ""  # empty: stderr
    max_frame: int = p.DEFAULT_MAX_FRAME
    window: int = p.DEFAULT_WINDOW
    frame_timeout: float = 3.0
    max_buffered: int = AGENT_LIMIT  # bytes of partial frames across all connections
    max_inflight: int = 64  # commands running at once for one connection
    max_sessions: int = 64  # controllers served at once (listening channels)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"agent config {path}: {exc}") from None
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"agent config {path}: unknown keys {sorted(unknown)}")
        cfg = cls(**raw)
        if not p.MIN_MAX_FRAME <= cfg.max_frame <= 64 * 1024 * 1024:
            raise ConfigError(f"agent config {path}: max_frame must be 64 KiB..64 MiB")
        if cfg.max_buffered < cfg.max_frame:
            raise ConfigError(f"agent config {path}: max_buffered must be at least max_frame")
        if cfg.max_inflight < 1 or cfg.max_sessions < 1:
            raise ConfigError(f"agent config {path}: max_inflight and max_sessions must be >= 1")
        return cfg

    def permits(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pat) for pat in self.deny):
            return False
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.allow)


_JSON = json.JSONEncoder(default=str)  # built once: json.dumps(default=) builds one a line
_second = (-1, "")


def _stamp(when: float) -> str:
    """ISO 8601 UTC with milliseconds (the second's text is cached: one audit line per
    command is on the hot path)."""
    global _second  # noqa: PLW0603 - a one-entry cache
    sec = int(when)
    if _second[0] != sec:
        _second = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return f"{_second[1]}.{int(when % 1 * 1000):03d}Z"


class Agent:
    """The plugins and policy shared by every session of one agent process."""

    def __init__(self, config: AgentConfig, plugins: dict[str, Plugin] | None = None) -> None:
        self.config = config
        self.started = time.time()
        if plugins is None:
            plugins = load_plugins(config.plugins, self._plugin_failed)
        self.plugins = plugins
        self.commands: dict[tuple[str, str], Command] = {}
        for plugin in plugins.values():
            setattr(plugin, "agent", self)  # noqa: B010 - info and health read the agent
            for name, cmd in commands_of(plugin).items():
                self.commands[(plugin.name, name)] = cmd
        self._permitted: dict[tuple[str, str], bool] = {}
        self.budget = Budget(config.max_buffered)
        self.sessions = 0
        self._audit: TextIO = (
            open(config.audit_log, "a", buffering=1)  # noqa: SIM115 - lives as long as the agent
            if config.audit_log
            else sys.stderr
        )

    def close(self) -> None:
        """Close the audit log (the agent's sessions end with their channels)."""
        if self._audit is not sys.stderr:
            self._audit.close()

    def _plugin_failed(self, name: str, why: str) -> None:
        self._log({"event": "plugin_failed", "plugin": name, "error": why})

    def _log(self, record: dict[str, Any]) -> None:
        if "when" not in record:  # not setdefault: that would format a stamp every time
            record["when"] = _stamp(time.time())
        self._audit.write(_JSON.encode(record) + "\n")

    def audit(self, who: str, what: str, args: dict[str, Any], when: float, result: str) -> None:
        shown = {k: ("***" if k in _REDACT else v) for k, v in args.items()} if args else args
        self._log(
            {
                "event": "audit",
                "who": who,
                "what": what,
                "args": shown,
                "when": _stamp(when),
                "ms": round((time.time() - when) * 1000, 3),
                "result": result,
            }
        )

    def permits(self, name: str, key: tuple[str, str]) -> bool:
        """`AgentConfig.permits`, remembered for the agent's own commands (a bounded set: a
        controller's unknown names are matched every time, never stored)."""
        allowed = self._permitted.get(key)
        if allowed is None:
            allowed = self.config.permits(name)
            if key in self.commands:
                self._permitted[key] = allowed
        return allowed

    def welcome(self, version: int) -> p.Welcome:
        infos: dict[str, p.PluginInfo] = {}
        for (plugin, name), _ in sorted(self.commands.items()):
            prev = infos.get(plugin)
            cmds = (*prev.commands, name) if prev else (name,)
            infos[plugin] = p.PluginInfo(self.plugins[plugin].version, cmds)
        return p.Welcome(
            version,
            keel.__version__,
            self.config.instance_id,
            infos,
            self.config.max_frame,
            self.config.window,
        )

    async def serve(self, channel: Channel, *, dialed: bool = False) -> None:
        """Serve one channel until it ends. ``dialed``: a long-lived channel this agent
        opened (virtio-serial, vsock), where a controller may already be waiting."""
        if self.sessions >= self.config.max_sessions:
            self._log({"event": "refused", "who": channel.peer, "reason": "max_sessions"})
            busy = p.Error(0, "busy", f"the agent serves {self.config.max_sessions} at most")
            with contextlib.suppress(AgentError):
                await channel.write(p.encode(busy))
            return
        self.sessions += 1
        try:
            await Session(self, channel, dialed=dialed).run()
        finally:
            self.sessions -= 1


class _Running:
    """A command in flight: its task, upload inbox and the credit the controller gave."""

    def __init__(self, call: p.Call, window: int) -> None:
        self.call = call
        self.task: asyncio.Task[None] | None = None
        self.credit = call.window
        self.credit_wake = asyncio.Event()
        self.inbox: deque[p.Data] = deque()
        self.inbox_wake = asyncio.Event()
        self.window = window
        self.granted = 0
        self.cancelled_by_peer = False


class _Context:
    def __init__(self, session: Session, run: _Running) -> None:
        self._s = session
        self._run = run
        self.peer = session.who
        self.chunk_size = min(p.CHUNK, session.max_frame - 1024)

    async def send(self, data: Bytes, stream: int = 0) -> None:
        run = self._run
        view = memoryview(data)
        for start in range(0, max(len(view), 1), self.chunk_size):
            while run.credit <= 0:
                run.credit_wake.clear()
                await run.credit_wake.wait()
            run.credit -= 1
            # msgspec encodes any buffer as bin; the frame holds its own copy.
            piece = cast(bytes, view[start : start + self.chunk_size])
            await self._s.write(p.Data(run.call.id, piece, stream))

    async def receive(self) -> AsyncIterator[bytes]:
        run = self._run
        run.granted = run.window
        await self._s.write(p.Credit(run.call.id, run.window))
        consumed = 0
        while True:
            while not run.inbox:
                run.inbox_wake.clear()
                await run.inbox_wake.wait()
            chunk = run.inbox.popleft()
            consumed += 1
            if not chunk.end and consumed * 2 >= run.window:
                run.granted += consumed
                await self._s.write(p.Credit(run.call.id, consumed))
                consumed = 0
            if chunk.data:
                yield chunk.data
            if chunk.end:
                return


def _error_code(exc: BaseException) -> str:
    table: list[tuple[type[BaseException], str]] = [
        (FrameTooLarge, "too_large"),
        (ProtocolError, "protocol"),
        (CommandDenied, "denied"),
        (UnknownCommand, "unknown"),
        (BadArguments, "invalid"),
        (AgentTimeout, "timeout"),
        (IntegrityError, "integrity"),
        (AgentBusy, "busy"),
    ]
    for cls, code in table:
        if isinstance(exc, cls):
            return code
    return "failed"


_SLICE = 0.002  # seconds of inline work before the session lets other connections run


class Session:
    """One channel's conversation with one controller at a time."""

    def __init__(self, agent: Agent, channel: Channel, *, dialed: bool = False) -> None:
        self.agent = agent
        self.channel = channel
        self.dialed = dialed
        self.who = channel.peer
        self.decoder = p.FrameDecoder(agent.config.max_frame)
        self.running: dict[int, _Running] = {}
        self.version = 0
        self.max_frame = agent.config.max_frame  # lowered to the controller's, if smaller
        self._lock = asyncio.Lock()
        self._holding = Holding(agent.budget)
        self._dead: AgentError | None = None  # the channel broke: stop all work for it

    async def write(self, msg: p.Message) -> None:
        await self.write_raw(p.encode(msg))

    async def write_raw(self, data: Bytes) -> None:
        if self._dead is not None:
            raise self._dead
        try:
            async with self._lock:
                await self.channel.write(data)
        except AgentError as exc:
            self._dead = self._dead or exc
            raise

    async def run(self) -> None:
        try:
            if not self.dialed or await self._announce():
                await self._loop()
        except AgentError as exc:
            self._dead = self._dead or exc
        finally:
            self._holding.release()
            await self._cancel_all()
            await self.channel.close()
        if self._dead is not None:
            reason = str(self._dead)
            self.agent._log({"event": "channel_closed", "who": self.who, "reason": reason})

    async def _announce(self) -> bool:
        """On a channel that outlives us, a controller may be mid-conversation with the agent
        we replace: tell it to resync, and ignore what it sent before its sync token. False
        if nobody is there (a virtio-serial port with no host): that is no error to log."""
        self.decoder.hunt()
        try:
            await self.write(p.Error(0, "reset", "the agent (re)started on this channel; resync"))
        except AgentError:
            self._dead = None
            return False
        return True

    async def _loop(self) -> None:
        limit = self.agent.config.frame_timeout
        # A frame must be whole within ``limit`` of its first byte. Measured from the start,
        # not from the last byte: a controller re-sending sync tokens into a bogus length
        # would otherwise keep a junk frame open forever.
        frame_deadline: float | None = None
        slice_end = time.monotonic() + _SLICE
        waited = self.channel.waited
        while self._dead is None:
            # Over the agent's budget for partial frames, a session assembling a large one
            # stops reading (back-pressure) until others finish theirs or its deadline passes.
            if self._holding.must_wait():
                await self._holding.room(frame_deadline)
            try:
                if frame_deadline is None:
                    data = await self.channel.read(p.CHUNK)
                else:
                    async with asyncio.timeout(max(frame_deadline - time.monotonic(), 0)):
                        data = await self.channel.read(p.CHUNK)
            except TimeoutError:
                frame_deadline = None
                self.decoder.hunt()
                self._holding.set(0)
                await self._error(0, ProtocolError("a frame stalled half-sent; dropped it"))
                continue
            if not data:
                return
            if self.channel.waited != waited:
                # The read waited for the controller: the loop served the others meanwhile,
                # so a new slice starts (no extra turn of the loop per command).
                waited = self.channel.waited
                slice_end = time.monotonic() + _SLICE
            events = self.decoder.feed(data)
            self._holding.set(self.decoder.buffered)
            if not self.decoder.mid_frame:
                frame_deadline = None
            elif frame_deadline is None or events:
                frame_deadline = time.monotonic() + limit
            slice_end = await self._dispatch(events, slice_end)

    async def _dispatch(self, events: list[p.Event], slice_end: float) -> float:
        for event in events:
            if self._dead is not None:
                break  # the controller is gone: what it queued is not run
            try:
                await self._on_event(event)
            except AgentError:
                raise  # the channel itself failed
            except Exception as exc:
                # A bug of ours must not end the session: report it, keep serving.
                self.agent._log({"event": "internal_error", "who": self.who, "error": repr(exc)})
                await self._error(0, CommandFailed("internal agent error; see its log"))
            if time.monotonic() >= slice_end:
                # Inline commands never wait: without this a flood from one controller would
                # keep every other one waiting until all of it was answered.
                await asyncio.sleep(0)
                slice_end = time.monotonic() + _SLICE
        return slice_end

    async def _error(self, rid: int, exc: BaseException) -> None:
        await self.write(self._error_frame(rid, exc))

    async def _on_event(self, event: p.Event) -> None:
        if isinstance(event, p.Garbage):
            await self._error(0, event.error)
        elif isinstance(event, p.Sync):
            if not event.ack:
                await self._cancel_all()
                await self.write_raw(p.ack_token(event.nonce))
        else:
            try:
                msg = p.decode(event.payload)
            except ProtocolError as exc:
                await self._error(0, exc)
                return
            await self._on_message(msg)

    async def _on_message(self, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            common = set(msg.versions) & set(p.PROTOCOL_VERSIONS)
            if not common:
                await self._error(0, ProtocolError(f"no common version in {msg.versions}"))
                return
            self.version = max(common)
            if msg.max_frame < p.MIN_MAX_FRAME:
                await self._error(0, ProtocolError(f"max_frame {msg.max_frame} is too small"))
                return
            self.max_frame = min(self.agent.config.max_frame, msg.max_frame)
            self.who = f"{self.channel.peer}/{msg.client[:64]}"
            await self.write(self.agent.welcome(self.version))
        elif isinstance(msg, p.Call):
            await self._start(msg)
        elif isinstance(msg, p.Data):
            await self._on_data(msg)
        elif isinstance(msg, p.Credit):
            run = self.running.get(msg.id)
            if run is not None and 0 < msg.n <= 1024:
                run.credit += msg.n
                run.credit_wake.set()
        elif isinstance(msg, p.Cancel):
            run = self.running.get(msg.id)
            if run is not None and run.task is not None:
                run.cancelled_by_peer = True
                run.task.cancel()
        else:
            await self._error(0, ProtocolError(f"a controller does not send {type(msg).__name__}"))

    async def _on_data(self, msg: p.Data) -> None:
        run = self.running.get(msg.id)
        if run is None:
            return  # the command already ended; its upload's tail is dropped
        if run.granted <= 0:
            await self._error(msg.id, StreamLimitExceeded("upload past the granted credit"))
            if run.task is not None:
                run.task.cancel()
            return
        run.granted -= 1
        run.inbox.append(msg)
        run.inbox_wake.set()

    async def _start(self, call: p.Call) -> None:
        name = f"{call.plugin}.{call.command}"
        when = time.time()
        try:
            if not self.version:
                raise ProtocolError("send hello before calls")
            if call.id in self.running or call.id <= 0:
                raise ProtocolError(f"request id {call.id} is already in flight or invalid")
            if not 0 < call.window <= 1024:
                raise ProtocolError(f"window {call.window} is out of range 1..1024")
            if len(self.running) >= self.agent.config.max_inflight:
                limit = self.agent.config.max_inflight
                raise AgentBusy(f"{limit} commands already run for this controller", limit=limit)
            if not self.agent.permits(name, (call.plugin, call.command)):
                raise CommandDenied(f"{name} is not allowed on this agent", command=name)
            cmd = self.agent.commands.get((call.plugin, call.command))
            if cmd is None:
                raise UnknownCommand(f"this agent has no command {name}", command=name)
            kwargs = cmd.bind(call.args)
        except AgentError as exc:
            self.agent.audit(self.who, name, call.args, when, f"error:{_error_code(exc)}")
            await self._error(call.id, exc)
            return
        run = _Running(call, self.agent.config.window)
        self.running[call.id] = run
        if cmd.inline:
            await self._run(run, cmd, kwargs, when)
        else:
            run.task = asyncio.create_task(self._run(run, cmd, kwargs, when))

    async def _run(self, run: _Running, cmd: Command, kwargs: dict[str, Any], when: float) -> None:
        call = run.call
        outcome = "ok"
        reply: p.Message
        try:
            if call.timeout is None or cmd.inline:
                # An inline command never waits, so a deadline could never interrupt it.
                value = await cmd.fn(_Context(self, run), **kwargs)
            else:
                async with asyncio.timeout(call.timeout):
                    value = await cmd.fn(_Context(self, run), **kwargs)
            reply = p.Result(call.id, value)
        except TimeoutError:
            exc: BaseException = AgentTimeout(
                f"{cmd.full_name} ran past its {call.timeout}s deadline", command=cmd.full_name
            )
            outcome = "error:timeout"
            reply = self._error_frame(call.id, exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            reply = p.Error(call.id, "cancelled", f"{cmd.full_name} was cancelled")
            if not run.cancelled_by_peer:
                self._finish(run, cmd, call, when, outcome)
                raise
        except Exception as exc:
            outcome = f"error:{_error_code(exc)}"
            reply = self._error_frame(call.id, exc)
        self._finish(run, cmd, call, when, outcome)
        try:
            frame = p.encode_checked(reply, self.max_frame)
        except (FrameTooLarge, TypeError, ValueError) as exc:
            frame = p.encode(self._error_frame(call.id, CommandFailed(f"bad result: {exc}")))
        try:  # noqa: SIM105 - contextlib.suppress costs three Python calls per command
            await self.write_raw(frame)
        except AgentError:
            pass  # the channel broke: the session ends and says so

    def _finish(self, run: _Running, cmd: Command, call: p.Call, when: float, out: str) -> None:
        self.running.pop(call.id, None)
        self.agent.audit(self.who, cmd.full_name, call.args, when, out)

    def _error_frame(self, rid: int, exc: BaseException) -> p.Error:
        fields: dict[str, Any] = {}
        for key in ("size", "limit", "expected", "actual", "detail", "exit_code"):
            value = getattr(exc, key, None)
            if isinstance(value, str | int | float):
                fields[key] = value
        return p.Error(rid, _error_code(exc), str(exc) or type(exc).__name__, fields)

    async def _cancel_all(self) -> None:
        tasks = [r.task for r in self.running.values() if r.task is not None]
        for run in self.running.values():
            run.cancelled_by_peer = False
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.running.clear()
