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
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import AntiPatternError, CallTimeout, UnsupportedVersion
from keel.messaging import _context, _metrics, _presence, _tap
from keel.messaging._failures import from_failure, qualified
from keel.messaging._link import link
from keel.messaging._target import Target, fanout_subject, parse_version, rpc_queue
from keel.messaging.transports.base import Transport
from keel.wire import (
    CALL,
    CAST,
    ENVELOPE_VERSION,
    FANOUT,
    Failure,
    Request,
    RequestContext,
    encode,
    new_id,
)

log = logging.getLogger("keel.messaging.client")

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
        allowed_exceptions: Iterable[type[BaseException]] = (),
        service: str | None = None,
        version_cap: str | None = None,
    ) -> None:
        if not target.topic:
            raise ValueError("an RPC client needs a target with a topic")
        _check_timeout(timeout)
        self.transport = transport
        self._options = _Options(target, timeout, cast_ttl, None)
        self._allowed = {qualified(cls): cls for cls in allowed_exceptions}
        if version_cap is not None and version_cap != "auto":
            parse_version(version_cap)
        self._cap = version_cap
        self._watch: _presence.VersionWatch | None = None
        self.service = service or urls.from_env("service", "")
        self._link = link(transport)
        self.counts: Counter[tuple[str, ...]] = Counter()
        self.metric_labels = {"topic": target.topic}
        self._warned: set[tuple[str, str]] = set()
        _metrics.track(self)

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
    ) -> RPCClient:
        """A client sharing this one's connection with some options changed."""
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
        clone = object.__new__(RPCClient)
        clone.__dict__.update(self.__dict__)
        clone._options = _Options(
            target,
            options.timeout if timeout is _UNSET else timeout,
            options.cast_ttl if cast_ttl is _UNSET else cast_ttl,
            options.idempotency_key if idempotency_key is _UNSET else idempotency_key,
        )
        return clone

    # --- the three patterns --------------------------------------------------------------

    async def call(self, ctx: RequestContext | None, method: str, /, **kwargs: Any) -> Any:
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
        parent = ctx or _context.current_context()
        deadline = _sooner(now + options.timeout, parent)
        child = self._child(parent, deadline, method)
        self._check_reentrant(target, method)
        lk = self._link
        # Both are set up once per transport; skipping the awaits keeps the hot path short.
        reply_to = lk.reply_to or await lk.reply_queue()
        queue = options.queue
        if queue not in lk.declared:
            await lk.declare(queue, durable=True)
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            request_id = new_id()
            request = Request(
                ENVELOPE_VERSION, CALL, request_id, method, child, kwargs,
                target.namespace, target.version, reply_to, target.server, attempt,
            )  # fmt: skip
            body = self._encode(request, method)
            future = lk.expect(request_id, loop)
            timer = loop.call_at(loop.time() + (deadline - time.time()), _expire, future)
            try:
                await self.transport.send(queue, body, durable=False)
                reply = await future
            except TimeoutError:
                self.counts["keel_rpc_client_requests", "call", method, "timeout"] += 1
                self._report(method, "call", "timeout", started, child.traceparent)
                raise _timeout(target, method, child, deadline - now) from None
            finally:
                timer.cancel()
                lk.forget(request_id, future)
            failure = reply.failure
            if failure is None:
                self.counts["keel_rpc_client_requests", "call", method, "ok"] += 1
                if _tap.state.tap is not None:
                    self._report(method, "call", "ok", started, child.traceparent)
                return reply.result
            pause = min(RETRY_PAUSE * attempt, RETRY_PAUSE_MAX, deadline - time.time())
            if _retryable_drain(failure) and pause > 0:
                self.counts["keel_rpc_client_requests", "call", method, "retried"] += 1
                await asyncio.sleep(pause)
                continue
            self.counts["keel_rpc_client_requests", "call", method, "error"] += 1
            self._report(method, "call", "error", started, child.traceparent)
            raise from_failure(failure, self._allowed, f"{target.topic}.{method}")

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
            return RequestContext(deadline=deadline, service=self.service or None)
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
            self._warn_once(
                "huge-payload",
                method,
                f"{self.target.topic}.{method} sent {len(body)} bytes (limit {limit}); "
                "send a reference to the data instead",
            )
        return body

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


def _timeout(target: Target, method: str, ctx: RequestContext, waited: float) -> CallTimeout:
    where = f"server {target.server!r}" if target.server else "any server"
    return CallTimeout(
        f"no reply to {target.topic}.{method} from {where} within {waited:.3g}s (request "
        f"{ctx.request_id}); check that a server of topic {target.topic!r} is running and "
        "not overloaded",
        topic=target.topic,
        server=target.server,
        method=method,
        timeout=waited,
    )


def _retryable_drain(failure: Failure) -> bool:
    if not (failure.keel and failure.type.endswith(".ServerDraining")):
        return False
    return not failure.fields.get("started", True) or bool(failure.fields.get("idempotent"))


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _check_timeout(timeout: float | None) -> None:
    if timeout is None or not timeout > 0 or timeout == float("inf"):
        raise AntiPatternError(
            f"timeout={timeout!r}: every call needs a finite deadline (pattern: "
            "call-without-deadline); a call without one holds its caller forever when a "
            "server dies",
            pattern="call-without-deadline",
        )
