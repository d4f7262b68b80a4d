"""RPC clients: call (request/reply with a deadline), cast (one server) and fanout (all).

Every call has a deadline: the client's timeout, or the caller's own deadline if that comes
first (a nested call never outlives the request it serves). A call whose deadline passes
raises `CallTimeout` naming topic, server and method; a reply that arrives later is dropped
and counted. Keel refuses or warns about the anti-patterns it can see at run time (see
docs/patterns.md): calls without a deadline, a call into the caller's own saturated server,
call chains that are too deep, payloads near the size limit.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import AntiPatternError, CallTimeout, ConfigError, UnsupportedVersion
from keel.messaging import _context, _metrics, _presence, _tap
from keel.messaging._failures import from_failure, qualified
from keel.messaging._link import Link, link
from keel.messaging._target import Target, fanout_subject, parse_version, rpc_queue
from keel.messaging.transports.base import Transport, send_nowait
from keel.wire import (
    CALL,
    CAST,
    ENVELOPE_VERSION,
    FANOUT,
    Failure,
    Request,
    RequestContext,
    encode,
    new_call_ids,
    new_id,
    new_root_ids,
)

log = logging.getLogger("keel.messaging.client")
_get_ident = threading.get_ident

DEFAULT_TIMEOUT = 60.0
RETRY_PAUSE = 0.05  # first pause before resending a call a draining server handed back
RETRY_PAUSE_MAX = 0.5
FIRST_PRESENCE_WAIT = 1.0  # how long an auto-capped client waits to hear servers at first
CHAIN_WARN_DEPTH = 5
CHAIN_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class _Options:
    target: Target
    timeout: float
    cast_ttl: float | None
    idempotency_key: str | None
    monitor: float | None = None
    queue: str = field(init=False)  # derived once here, not per message

    def __post_init__(self) -> None:
        object.__setattr__(self, "queue", rpc_queue(self.target.topic, self.target.server))


_UNSET: Any = object()


class RPCClient:
    """Sends RPC messages to ``target``. Cheap to `prepare` copies with other options."""

    def __init__(
        self,
        transport: Transport,
        target: Target,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cast_ttl: float | None = None,
        monitor_timeout: float | None = None,
        allowed_exceptions: Iterable[type[BaseException]] = (),
        service: str | None = None,
        version_cap: str | None = None,
    ) -> None:
        if not target.topic:
            raise ValueError("an RPC client needs a target with a topic")
        _check_timeout(timeout)
        _check_monitor(monitor_timeout)
        self.transport = transport
        self._options = _Options(target, timeout, cast_ttl, None, monitor_timeout)
        self._allowed = {qualified(cls): cls for cls in allowed_exceptions}
        if version_cap is not None and version_cap != "auto":
            parse_version(version_cap)
        self._cap = version_cap
        self._watch: _presence.VersionWatch | None = None
        self.service = service or urls.from_env("service", "")
        self._link = link(transport)
        self._send_nowait = send_nowait(transport)
        self._counts: Counter[tuple[str, ...]] = Counter()
        # Calls answered, by method: the one count every call makes (see `counts`).
        self._ok = _metrics.Tally(("keel_rpc_client_requests", "call"), ("ok",))
        self._ok_calls = self._ok.by
        self.metric_labels = {"topic": target.topic}
        self._warned: set[tuple[str, str]] = set()
        _metrics.track(self)

    counts = _metrics.FoldedCounts("Requests sent, by (family, kind, method, outcome).")

    @property
    def target(self) -> Target:
        return self._options.target

    def gauges(self) -> dict[str, float]:
        return {}

    def prepare(
        self,
        *,
        server: str | None = _UNSET,
        version: str = _UNSET,
        namespace: str | None = _UNSET,
        timeout: float = _UNSET,
        cast_ttl: float | None = _UNSET,
        idempotency_key: str | None = _UNSET,
        monitor_timeout: float | None = _UNSET,
    ) -> RPCClient:
        """A client sharing this one's connection with some options changed.

        ``monitor_timeout`` turns on the call monitor: the server sends a heartbeat while the
        method runs, and a call gives up (`CallTimeout`) after that many seconds without a
        reply or a heartbeat, however far its deadline is (oslo.messaging's
        ``call_monitor_timeout``).
        """
        options = self._options
        target = options.target
        changes: dict[str, Any] = {}
        if server is not _UNSET:
            changes["server"] = server
        if version is not _UNSET:
            parse_version(version)
            changes["version"] = version
        if namespace is not _UNSET:
            changes["namespace"] = namespace
        if changes:
            target = replace(target, **changes)
        if timeout is not _UNSET:
            _check_timeout(timeout)
        if monitor_timeout is not _UNSET:
            _check_monitor(monitor_timeout)
        clone = object.__new__(RPCClient)
        clone.__dict__.update(self.__dict__)
        clone._options = _Options(
            target,
            options.timeout if timeout is _UNSET else timeout,
            options.cast_ttl if cast_ttl is _UNSET else cast_ttl,
            options.idempotency_key if idempotency_key is _UNSET else idempotency_key,
            options.monitor if monitor_timeout is _UNSET else monitor_timeout,
        )
        return clone

    # --- the three patterns --------------------------------------------------------------

    async def call(  # noqa: PLR0912, PLR0915 - the hot path, inlined
        self, ctx: RequestContext | None, method: str, /, **kwargs: Any
    ) -> Any:
        """Run ``method`` on one server of the topic and return its result.

        A call a draining server hands back unstarted (or an idempotent one it was stopped
        in) is sent again, within the same deadline, without the caller noticing.
        """
        options = self._options
        target = options.target
        started = time.perf_counter()
        if self._cap is not None:
            await self._check_cap(target)
        now = time.time()
        handling = _context.current.get()  # the request this task serves, if any
        parent = ctx or (handling[1] if handling is not None else None)
        deadline = (
            now + options.timeout if parent is None else _sooner(now + options.timeout, parent)
        )
        if parent is None:
            # _child's root case, inlined (positional: the Struct's field order), with the
            # first attempt's message id from the same draw.
            root_id, traceparent, first_id = new_call_ids()
            child = RequestContext(
                root_id, None, None, (), traceparent, deadline, self.service or None
            )
        else:
            child = self._child(parent, deadline, method)
            first_id = new_id()
        if handling is not None:
            self._check_reentrant(target, method)
        lk = self._link
        queue = options.queue
        if queue not in lk.declared:
            await lk.declare(queue, durable=True)
        # The link's loop if it runs on this thread (so it is the running one): asking asyncio
        # costs a getpid() system call (3.11's fork check) per call.
        loop: asyncio.AbstractEventLoop | None = lk.loop
        if loop is None or loop._thread_id != _get_ident():  # type: ignore[attr-defined]
            loop = asyncio.get_running_loop()
            if isinstance(loop, asyncio.BaseEventLoop):  # uvloop's do not say their thread
                lk.loop = loop
        monitor = options.monitor
        limit = self.transport.max_message_bytes
        attempt = 0
        while True:
            attempt += 1
            request_id = first_id if attempt == 1 else new_id()
            ends = loop.time() + (deadline - time.time())
            future = lk.expect(request_id, loop, None if monitor else ends)
            watchdog = None
            try:
                # Read after expect, never before an await: a reconnect moves calls to a new
                # reply queue and keeps the old one only for the calls it saw waiting.
                reply_to = lk.reply_to or await lk.reply_queue()
                request = Request(
                    ENVELOPE_VERSION, CALL, request_id, method, child, kwargs,
                    target.namespace, target.version, reply_to, target.server, attempt, monitor,
                )  # fmt: skip
                body = encode(request, limit)
                if len(body) > limit // 4:
                    self._warn_huge(method, len(body))
                if monitor is not None:
                    watchdog = _watch(lk, request_id, future, ends, monitor)
                if self._send_nowait is not None:
                    self._send_nowait(queue, body, durable=False)
                else:
                    await self.transport.send(queue, body, durable=False)
                reply = await future
            except BaseException as exc:
                if watchdog is not None:
                    watchdog.cancel()
                lk.forget(request_id, future)
                if not isinstance(exc, TimeoutError):
                    raise
                self.counts["keel_rpc_client_requests", "call", method, "timeout"] += 1
                self._report(method, "call", "timeout", started, child.traceparent)
                raise _timeout(
                    target,
                    method,
                    child,
                    deadline - now,
                    window=monitor,
                    silent=watchdog is not None and watchdog.silent,
                ) from None
            # Answered: the reply router let go of the id as it resolved the future, so only
            # a monitor's heartbeat entry is left to drop (forget, without its checks).
            if watchdog is not None:
                watchdog.cancel()
                lk.forget(request_id, future)
            failure = reply.failure
            if failure is None:
                ok = self._ok_calls
                ok[method] = ok.get(method, 0) + 1
                if _tap.state.tap is not None:
                    self._report(method, "call", "ok", started, child.traceparent)
                return reply.result
            await asyncio.sleep(
                self._retry_pause(
                    failure, attempt, deadline=deadline, method=method, started=started, child=child
                )
            )

    def _retry_pause(
        self,
        failure: Failure,
        attempt: int,
        *,
        deadline: float,
        method: str,
        started: float,
        child: RequestContext,
    ) -> float:
        """How long to wait before sending a call a draining server handed back; raises the
        remote error for any other failure."""
        pause = min(RETRY_PAUSE * attempt, RETRY_PAUSE_MAX, deadline - time.time())
        if _retryable_drain(failure) and pause > 0:
            self.counts["keel_rpc_client_requests", "call", method, "retried"] += 1
            return pause
        self.counts["keel_rpc_client_requests", "call", method, "error"] += 1
        self._report(method, "call", "error", started, child.traceparent)
        raise from_failure(failure, self._allowed, f"{self.target.topic}.{method}")

    async def can_send_version(self, version: str) -> bool:
        """Whether a message needing ``version`` may be sent under the version cap now."""
        cap = await self._current_cap(self.target.namespace)
        return cap is None or parse_version(version) <= cap

    async def _current_cap(self, namespace: str | None) -> tuple[int, int] | None:
        if self._cap is None or self._cap != "auto":
            return None if self._cap is None else parse_version(self._cap)
        if self._watch is None:
            self._watch = _presence.watch(self.transport, self.target.topic)
            await self._watch.start()
            await self._watch.wait_heard(FIRST_PRESENCE_WAIT)
        return self._watch.cap(namespace)

    async def _check_cap(self, target: Target) -> None:
        cap = await self._current_cap(target.namespace)
        if cap is not None and target.version_tuple > cap:
            raise UnsupportedVersion(
                f"{target.topic} message needs version {target.version} but the client's "
                f"version cap is {cap[0]}.{cap[1]} (older servers still run); check "
                "can_send_version() and fall back to the older method",
                requested=target.version,
                served=f"{cap[0]}.{cap[1]}",
            )

    async def cast(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> None:
        """Run ``method`` on one server of the topic (or the named server); no reply.

        Returns once the broker holds the message. At-least-once, deduplicated by
        idempotency key (the message id, or the key given to `prepare`).
        """
        target = self._options.target
        key = self._options.idempotency_key or new_id()
        body, child = await self._one_way(ctx, CAST, key, method, kwargs, server=target.server)
        queue = self._options.queue
        await self._link.declare(queue, durable=True)
        await self.transport.send(queue, body, durable=True)
        self.counts["keel_rpc_client_requests", "cast", method, "sent"] += 1
        if _tap.state.tap is not None:
            self._report(method, "cast", "sent", 0.0, child.traceparent)

    async def fanout(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> None:
        """Run ``method`` on every server of the topic live now; no reply (at-most-once)."""
        body, child = await self._one_way(ctx, FANOUT, new_id(), method, kwargs, server=None)
        subject = fanout_subject(self._options.target.topic)
        await self.transport.publish(subject, body, durable=False)
        self.counts["keel_rpc_client_requests", "fanout", method, "sent"] += 1
        if _tap.state.tap is not None:
            self._report(method, "fanout", "sent", 0.0, child.traceparent)

    async def _one_way(
        self,
        ctx: RequestContext | None,
        kind: int,
        message_id: str,
        method: str,
        kwargs: dict[str, Any],
        *,
        server: str | None,
    ) -> tuple[bytes, RequestContext]:
        options = self._options
        target = options.target
        if self._cap is not None:
            await self._check_cap(target)
        deadline = time.time() + options.cast_ttl if options.cast_ttl is not None else None
        child = self._child(ctx or _context.current_context(), deadline, method)
        request = Request(
            ENVELOPE_VERSION, kind, message_id, method, child, kwargs,
            target.namespace, target.version, None, server,
        )  # fmt: skip
        return self._encode(request, method), child

    # --- helpers -------------------------------------------------------------------------

    def _report(
        self, method: str, pattern: str, outcome: str, started: float, traceparent: str
    ) -> None:
        tap = _tap.state.tap
        if tap is None:
            return
        try:
            tap.on_request(
                caller=self.service or "?",
                caller_method=_context.current_method(),
                topic=self.target.topic,
                method=method,
                pattern=pattern,
                version=self.target.version,
                outcome=outcome,
                seconds=time.perf_counter() - started if started else 0.0,
                traceparent=traceparent,
            )
        except Exception as exc:
            _tap.failed(exc)

    def _child(
        self, parent: RequestContext | None, deadline: float | None, method: str
    ) -> RequestContext:
        if parent is None:
            request_id, traceparent = new_root_ids()
            return RequestContext(
                request_id=request_id,
                traceparent=traceparent,
                deadline=deadline,
                service=self.service or None,
            )
        child = parent.child(deadline=deadline, service=self.service or None)
        if child.depth > CHAIN_WARN_DEPTH:
            if child.depth > CHAIN_MAX_DEPTH:
                raise AntiPatternError(
                    f"call chain {child.depth} deep at {self.target.topic}.{method}: this looks "
                    "like a call loop (pattern: chatty-call-chain); pass references and let "
                    "one service do the work",
                    pattern="chatty-call-chain",
                )
            self._warn_once(
                "chatty-call-chain",
                method,
                f"call chain is {child.depth} deep at {self.target.topic}.{method}",
            )
        return child

    def _encode(self, request: Request, method: str) -> bytes:
        limit = self.transport.max_message_bytes
        body = encode(request, limit)
        if len(body) > limit // 4:
            self._warn_huge(method, len(body))
        return body

    def _warn_huge(self, method: str, size: int) -> None:
        self._warn_once(
            "huge-payload",
            method,
            f"{self.target.topic}.{method} sent {size} bytes (limit "
            f"{self.transport.max_message_bytes}); send a reference to the data instead",
        )

    def _check_reentrant(self, target: Target, method: str) -> None:
        found = _context.current.get()
        if found is None:
            return
        server = found[0]
        if getattr(server, "transport", None) is not self.transport:
            return
        if server.target.topic != target.topic:
            return
        if target.server is not None and target.server != server.name:
            return
        if server.free_slots <= 0:
            raise AntiPatternError(
                f"{target.topic}.{method} called from inside a handler of the same server, "
                f"which has no free slot ({server.max_concurrency} running): it would wait for "
                "itself (pattern: call-into-own-saturated-server); cast instead, or raise "
                "max_concurrency",
                pattern="call-into-own-saturated-server",
            )
        self._warn_once(
            "call-into-own-server",
            method,
            f"{target.topic}.{method} called from a handler of a server of the same topic; "
            "under load this deadlocks once every slot waits for itself",
        )

    def _warn_once(self, pattern: str, method: str, message: str) -> None:
        if (pattern, method) not in self._warned:
            self._warned.add((pattern, method))
            event(log, logging.WARNING, "anti_pattern", pattern=pattern, message=message)


def _sooner(deadline: float, parent: RequestContext | None) -> float:
    """A nested call never outlives the request it serves."""
    if parent is not None and parent.deadline is not None and parent.deadline < deadline:
        return parent.deadline
    return deadline


def _timeout(
    target: Target,
    method: str,
    ctx: RequestContext,
    waited: float,
    *,
    window: float | None = None,
    silent: bool = False,
) -> CallTimeout:
    where = f"server {target.server!r}" if target.server else "any server"
    if silent and window is not None:
        waited = window
        text = (
            f"no reply to {target.topic}.{method} from {where} and no heartbeat for "
            f"{window:.3g}s (the call monitor window; request {ctx.request_id}): the server "
            "is gone, stuck, or never took the request"
        )
    else:
        text = (
            f"no reply to {target.topic}.{method} from {where} within {waited:.3g}s (request "
            f"{ctx.request_id}); check that a server of topic {target.topic!r} is running and "
            "not overloaded"
        )
    return CallTimeout(
        text,
        topic=target.topic,
        server=target.server,
        method=method,
        timeout=waited,
    )


def _watch(
    lk: Link, request_id: str, future: asyncio.Future[Any], ends: float, monitor: float
) -> _Watchdog:
    """The timer of a call under a monitor window (plain calls use the link's deadlines)."""
    watchdog = _Watchdog(future.get_loop(), future, ends, monitor)
    lk.on_heartbeat(request_id, watchdog.beat)
    return watchdog


class _Watchdog:
    """A call's timer under a monitor window: fires at the deadline, or earlier after a
    window without a heartbeat."""

    __slots__ = ("_ends", "_future", "_handle", "_last", "_loop", "_window", "silent")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        ends: float,
        window: float,
    ) -> None:
        self._loop = loop
        self._future = future
        self._ends = ends
        self._window = window
        self._last = loop.time()
        self.silent = False
        self._handle = loop.call_at(min(ends, self._last + window), self._check)

    def beat(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        now = self._loop.time()
        quiet_until = self._last + self._window
        if now < self._ends and now < quiet_until:
            self._handle = self._loop.call_at(min(self._ends, quiet_until), self._check)
            return
        self.silent = now < self._ends
        _expire(self._future)

    def cancel(self) -> None:
        self._handle.cancel()


def _retryable_drain(failure: Failure) -> bool:
    if not (failure.keel and failure.type.endswith(".ServerDraining")):
        return False
    return not failure.fields.get("started", True) or bool(failure.fields.get("idempotent"))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _check_monitor(window: float | None) -> None:
    if window is not None and not 0 < window < float("inf"):
        raise ConfigError(f"monitor_timeout={window!r}: give a positive number of seconds")


def _check_timeout(timeout: float | None) -> None:
    if timeout is None or not timeout > 0 or timeout == float("inf"):
        raise AntiPatternError(
            f"timeout={timeout!r}: every call needs a finite deadline (pattern: "
            "call-without-deadline); a call without one holds its caller forever when a "
            "server dies",
            pattern="call-without-deadline",
        )
