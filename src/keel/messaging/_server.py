"""RPC servers: run endpoint methods for calls, casts and fanouts on one topic.

Delivery (docs/messaging-contract.md states it for users):

* call: the request is acknowledged when it is taken, before its method starts, so a server
  crash mid-call never runs it twice on any transport; the caller gets its reply, a typed
  error, or `CallTimeout` (retryable: retry it if the method is idempotent).
* cast: acknowledged after the method returns (at-least-once); a key already seen by the
  dedup store is skipped; a method that raises or cannot be found dead-letters the message
  with the reason, never drops it.
* fanout: at-most-once to the servers live when it was sent. A server holds at most
  ``max_concurrency`` fanouts waiting or running; more arriving meanwhile (a flood: the
  fanout queue has no credit window) are dropped and counted (outcome ``dropped``).
* A request past its deadline is never started (it is counted and logged).
* A body that is not a request this server reads (garbage, over ``max_message_bytes``, too
  deep, out of range, a newer envelope) is dead-lettered with the reason without running
  anything; so is a delivery whose handling fails inside Keel (keel.messaging._poison). Every
  delivery is settled and frees its slot, whatever it held.
* Stopping stops taking new messages, hands unstarted ones back to the broker for other
  servers at once (those waiting for a slot too), lets running ones finish up to the
  timeout, then cancels them: their callers get `ServerDraining` (retryable), their casts go
  back to the queue.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from keel import urls
from keel._log import event
from keel.errors import (
    InvalidArguments,
    KeelError,
    MalformedMessage,
    MessageTooLarge,
    SerializationError,
    ServerDraining,
    TransportError,
)
from keel.messaging import _context, _heavy, _metrics, _poison, _tap
from keel.messaging._dedup import DedupStore, MemoryDedup
from keel.messaging._endpoints import Dispatcher, Method
from keel.messaging._failures import to_failure
from keel.messaging._link import link
from keel.messaging._presence import DEFAULT_INTERVAL, Announcer
from keel.messaging._slots import Slots
from keel.messaging._target import Target, fanout_subject, rpc_queue
from keel.messaging._threads import run_sync
from keel.messaging.transports.base import (
    Consumer,
    Delivery,
    Transport,
    log_outcome,
    observe,
    send_nowait,
)
from keel.wire import (
    CALL,
    CAST,
    ENVELOPE_VERSION,
    FANOUT,
    Failure,
    Reply,
    Request,
    RequestContext,
    decode_request,
    encode,
    new_id,
)

log = logging.getLogger("keel.messaging.server")

# The task running now, in C: on 3.11 asyncio.current_task is a Python function around this
# table (loop -> task), a measurable share of a call's server side (two lookups per call).
_RUNNING: dict[asyncio.AbstractEventLoop, asyncio.Task[Any]] | None = (
    getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
)

KIND_NAMES = {CALL: "call", CAST: "cast", FANOUT: "fanout"}
DECLINE_PAUSE = 0.2  # seconds a draining server holds a cast for its successor before returning it
SWEEP_INTERVAL = 0.1  # how late past its deadline a call's handler may be cancelled
MIN_HEARTBEAT_INTERVAL = 0.05  # however small a caller's monitor window, no faster than this


class _DeadlinePassed(Exception):
    """A call's handler cancelled at the call's deadline (not a TimeoutError: a method may
    raise that itself, and its caller must get it)."""


class ServerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


def _default_server_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{new_id()[:6]}"


class RPCServer:
    """Serves ``endpoints`` on ``target.topic`` (and on ``target.server`` for direct messages).

    ``max_concurrency`` bounds the requests running at once; ``thread_pool_size`` bounds the
    threads running sync methods. ``dedup`` decides how long cast idempotency keys are kept.
    A call sent with a monitor window (``RPCClient.prepare(monitor_timeout=...)``) gets a
    heartbeat every half window while its method runs.
    """

    def __init__(
        self,
        transport: Transport,
        target: Target,
        endpoints: Sequence[object],
        *,
        max_concurrency: int = 64,
        thread_pool_size: int = 16,
        service: str | None = None,
        dedup: DedupStore | None = None,
        stop_timeout: float = 25.0,
        presence_interval: float = DEFAULT_INTERVAL,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        if not target.topic:
            raise ValueError("an RPC server needs a target with a topic")
        self.transport = transport
        self.target = target
        self.name = target.server or _default_server_name()
        # A made-up name has no successor to inherit its queue, so stopping deletes it; a
        # named server's queue waits for the next server of that name.
        self._named = target.server is not None
        self.service = service or urls.from_env("service", target.topic)
        self.max_concurrency = max_concurrency
        self.stop_timeout = stop_timeout
        # A face for another framework (the oslo.messaging driver) brings its own dispatcher:
        # its framework finds the method, Keel's server does everything around it.
        self._dispatcher = dispatcher or Dispatcher(endpoints)
        self._send_nowait = send_nowait(transport)
        self._dedup: DedupStore = dedup or MemoryDedup()
        self._thread_pool_size = thread_pool_size
        self._executor: ThreadPoolExecutor | None = None
        self._slots = Slots(max_concurrency)
        self._new_work: list[Consumer] = []
        self._own: Consumer | None = None
        self._draining = False
        self._idle = asyncio.Event()
        self._drained = asyncio.Event()
        self._hurry = asyncio.Event()
        # Contexts of the requests running now, by id(request): drain lets their
        # continuations in. Trace ids are compared only then, not computed per request.
        self._running_ctx: dict[int, RequestContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fanouts = 0  # fanout deliveries taken and not finished
        self._dropped = _poison.LogBudget()
        self._fanout_queue = f"{fanout_subject(target.topic)}.{self.name}.{new_id()[:8]}"
        # Named once: every delivery carries its queue's name to the logs and dead letters.
        self._topic_queue = rpc_queue(target.topic)
        self._server_queue = rpc_queue(target.topic, self.name)
        self._warned: set[tuple[str, str]] = set()
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired_tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # The loop the consumers deliver on, set by start() (no delivery comes before): looking
        # it up costs a getpid() (asyncio's fork check) on each of a request's lookups.
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.state = ServerState.NEW
        self.running = 0
        self._counts: Counter[tuple[str, ...]] = Counter()
        self.metric_labels = {"topic": target.topic, "server": self.name}
        # Metric labels name methods this server has; anything else a sender makes up is "?".
        self._methods = frozenset(self._dispatcher.method_names())
        # Calls answered, by method: the one count every call makes (see `counts`).
        self._ok = _metrics.Tally(("keel_rpc_server_requests", "call"), ("ok",), self._label)
        self._ok_calls = self._ok.by
        self._presence = Announcer(
            transport,
            target.topic,
            self.name,
            self._announced_versions,
            lambda: self.state.value,
            interval=presence_interval,
        )
        _metrics.track(self)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is ServerState.SERVING:
            return
        self._set_state(ServerState.STARTING)
        self._draining = False
        self._loop = asyncio.get_running_loop()  # before the first consumer may deliver
        lk = link(self.transport)
        topic_queue = rpc_queue(self.target.topic)
        server_queue = rpc_queue(self.target.topic, self.name)
        await lk.declare(topic_queue, durable=True)
        await lk.declare(server_queue, durable=True)
        await self.transport.declare_queue(
            self._fanout_queue,
            durable=False,
            exclusive=True,
            bindings=[fanout_subject(self.target.topic)],
        )
        prefetch = self.max_concurrency
        consume = self.transport.consume
        # New work arrives on the shared topic queue and the fanout queue; the server's own
        # queue also carries continuations of work it already runs, so drain keeps it open.
        self._new_work = [
            await consume(topic_queue, self._on_shared, prefetch=prefetch),
            await consume(self._fanout_queue, self._on_fanout, prefetch=0, auto_ack=True),
        ]
        self._own = await consume(server_queue, self._on_own, prefetch=prefetch)
        loop = self._loop
        self._sweeper = observe(loop.create_task(self._sweep_deadlines()), log)
        self._set_state(ServerState.SERVING)
        await self._presence.start()
        tap = _tap.state.tap
        if tap is not None:
            try:
                tap.on_serve(
                    topic=self.target.topic,
                    service=self.service,
                    versions=self._announced_versions(),
                    methods=self._dispatcher.method_names(),
                )
            except Exception as exc:
                _tap.failed(exc)

    async def _sweep_deadlines(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self._forget_done()
            now = time.time()
            for task, deadline in list(self._deadlines.items()):
                if deadline <= now and task not in self._expired_tasks:
                    self._expired_tasks.add(task)
                    task.cancel()

    def _forget_done(self) -> None:
        # Finished handlers leave the task set here, in one pass, rather than through a done
        # callback each (a callback per request cost more than the sweep). What one ended
        # with is retrieved and logged, as `observe` would: _handle catches everything, so
        # an exception here is a bug, never one asyncio reports as lost.
        tasks = self._tasks
        running = {task for task in tasks if not task.done()}
        for task in tasks.difference(running) if len(running) < len(tasks) else ():
            # log_outcome's checks inlined: nearly every handler ends without an exception.
            if not task.cancelled() and task.exception() is not None:
                log_outcome(task, log)
        self._tasks = running
        if self._expired_tasks:
            self._expired_tasks = {t for t in self._expired_tasks if not t.done()}

    async def drain(self, timeout: float | None = None) -> None:
        """Stop taking new work, finish what runs, hand back what has not started, stop.

        Continuations of running work (calls, casts addressed to this server that carry the
        trace of a request it is running) are still taken while running work lasts. Past
        ``timeout`` (default ``stop_timeout``) running methods are cancelled: their callers
        get `ServerDraining`, their casts go back to the queue.
        """
        if self.state in (ServerState.NEW, ServerState.STOPPED):
            self._set_state(ServerState.STOPPED)
            return
        if self.state is ServerState.DRAINING:
            if timeout is not None and timeout <= 0:
                self._hurry.set()  # a second stop request: cut the running drain short
            await self._drained.wait()
            return
        self._set_state(ServerState.DRAINING)
        self._draining = True
        # Requests waiting for a slot have not started: hand them back now, not when a
        # running handler ends (continuations of running work wait again for theirs).
        # Before the consumers' cancel, which can take a while (NATS keeps listening for
        # stragglers): a slot freed meanwhile must not start one of them here.
        self._slots.wake_all()
        for consumer in self._new_work:
            await consumer.cancel()
        self._new_work.clear()
        await self._presence.announce()
        await self.transport.delete_queue(self._fanout_queue)
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.stop_timeout if timeout is None else timeout)
        while self.running and loop.time() < end and not self._hurry.is_set():
            self._idle.clear()
            idle = loop.create_task(self._idle.wait())
            hurry = loop.create_task(self._hurry.wait())
            await asyncio.wait(
                [idle, hurry], timeout=end - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
            idle.cancel()
            hurry.cancel()
        if self._own is not None:
            await self._own.cancel()
            self._own = None
        late = {t for t in self._tasks if not t.done() and t is not asyncio.current_task()}
        if late and not self._hurry.is_set():
            _, late = await asyncio.wait(late, timeout=max(0.0, end - loop.time()))
        for task in late:
            task.cancel()
        if late:
            event(log, logging.WARNING, "server.drain_cancelled", server=self.name, tasks=len(late))
            await asyncio.wait(late)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._forget_done()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        await self._presence.stop()
        if not self._named:
            await self.transport.delete_queue(rpc_queue(self.target.topic, self.name))
        self._set_state(ServerState.STOPPED)
        self._drained.set()

    async def stop(self, timeout: float | None = None) -> None:
        """The same as `drain`: a server stopping to die and one stopping for an upgrade
        follow one path."""
        await self.drain(timeout)

    async def __aenter__(self) -> RPCServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _set_state(self, state: ServerState) -> None:
        self.state = state
        event(
            log,
            logging.INFO,
            "server.state",
            server=self.name,
            topic=self.target.topic,
            state=state.value,
        )

    def gauges(self) -> dict[str, float]:
        return {
            "keel_rpc_server_running": self.running,
            "keel_rpc_server_waiting": self.waiting,
            "keel_rpc_server_serving": float(self.state is ServerState.SERVING),
        }

    @property
    def waiting(self) -> int:
        """Requests delivered to this server and waiting for a concurrency slot."""
        return self._slots.waiting

    @property
    def free_slots(self) -> int:
        return self.max_concurrency - self.running

    def namespaces(self) -> dict[str | None, tuple[int, int]]:
        return self._dispatcher.namespaces()

    def _announced_versions(self) -> dict[str, str]:
        return {ns or "": f"{v[0]}.{v[1]}" for ns, v in self._dispatcher.namespaces().items()}

    # --- per message ---------------------------------------------------------------------

    def _on_shared(self, delivery: Delivery) -> None:
        # _spawn, inlined: this runs for every request on the topic.
        self._tasks.add(asyncio.Task(self._handle(delivery, self._topic_queue), loop=self._loop))

    def _on_fanout(self, delivery: Delivery) -> None:
        # Auto-acknowledged, so no credit window holds a flood back: at most max_concurrency
        # fanouts wait or run here; the rest are dropped (at most once) and counted.
        if self._fanouts >= self.max_concurrency:
            self._count("fanout", "?", "dropped")
            if self._dropped.take():
                event(
                    log,
                    logging.WARNING,
                    "fanout.dropped",
                    server=self.name,
                    backlog=self._fanouts,
                    unlogged=self._dropped.unlogged or None,
                )
                self._dropped.unlogged = 0
            return
        self._fanouts += 1
        # Its queue's name is per process; its subject is what an operator knows.
        self._spawn(self._handle(delivery, fanout_subject(self.target.topic))).add_done_callback(
            self._fanout_done
        )

    def _fanout_done(self, task: asyncio.Task[None]) -> None:
        self._fanouts -= 1

    def _on_own(self, delivery: Delivery) -> None:
        self._spawn(self._handle(delivery, self._server_queue, own=True))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # A Task made directly skips the loop's create_task wrapper (and its debug and
        # closed checks) on every request; the loop is the one running this callback.
        task = asyncio.Task(coro, loop=self._loop)
        self._tasks.add(task)  # the sweeper drops it once done, and logs what it ended with
        return task

    async def _handle(  # noqa: PLR0912, PLR0915 - every request: _run inlined
        self, delivery: Delivery, queue: str, *, own: bool = False
    ) -> None:
        """Decode, wait for a slot (or hand back on drain), run; settle whatever happens."""
        # A handler that ends as it should takes its task out of the task set itself: finished
        # tasks held until the sweep (thousands of them at tens of thousands of calls a
        # second) cost more, in allocator and cache misses and in collector passes, than
        # everything else the server keeps per call. One an exception escapes (a bug: Keel
        # catches the rest below) or that was cancelled stays for the sweep, which logs it.
        task = asyncio.current_task() if _RUNNING is None else _RUNNING.get(self._loop)
        escaped = False
        try:
            body = delivery.body
            try:
                if len(body) > _heavy.HEAVY_BYTES:
                    request = await self._decode_heavy(delivery)
                else:
                    request = decode_request(body, self.transport.max_message_bytes)
            except MalformedMessage as exc:
                await self._malformed(delivery, queue, exc)
                return
            except Exception as exc:  # the decoders are total; this is a bug, handled the same
                await self._malformed(delivery, queue, _poison.crashed("request", exc))
                return
            started = False
            slots = self._slots
            try:
                while True:
                    if self._draining and not (own and self._continues(request.ctx)):
                        await self._decline(request, delivery, own=own)
                        return
                    # take(), inlined, first: the common free slot without the coroutine
                    # acquire() costs.
                    if slots.free > 0 and not slots._waiters:
                        slots.free -= 1
                        break
                    if await slots.acquire():
                        break
                started = True
                # _run, inlined: one coroutine fewer on every request.
                key = id(request)
                self.running += 1
                self._running_ctx[key] = request.ctx
                try:
                    kind = request.kind
                    if kind == CALL:
                        await self._do_call(request, delivery, task)
                    elif kind == CAST:
                        await self._do_cast(request, delivery)
                    else:  # the decoder admits CALL, CAST and FANOUT only
                        await self._do_fanout(request)
                finally:
                    self.running -= 1
                    del self._running_ctx[key]
                    if slots._waiters:  # release(), inlined for the common case: nobody waits
                        slots.release()
                    else:
                        slots.free += 1
                    # Only a drain waits for the server to go idle.
                    if not self.running and self._draining:
                        self._idle.set()
            except asyncio.CancelledError:
                if not started and not delivery.settled:
                    await delivery.requeue()
                raise
            except TransportError as exc:  # settling failed: the broker redelivers what it holds
                event(log, logging.WARNING, "request.settle_failed", queue=queue, error=exc)
            except Exception as exc:  # a bug in Keel or in what it calls (a dedup store, a tap)
                await self._malformed(delivery, queue, _poison.crashed("request", exc))
        except BaseException:
            escaped = True
            raise
        finally:
            if not escaped:
                self._tasks.discard(task)

    async def _decode_heavy(self, delivery: Delivery) -> Request:
        try:
            await _heavy.acquire()
        except asyncio.CancelledError:  # stopped while it waited for its turn: not started
            if not delivery.settled:
                await delivery.requeue()
            raise
        try:
            return decode_request(delivery.body, self.transport.max_message_bytes)
        finally:
            _heavy.release()

    async def _malformed(self, delivery: Delivery, queue: str, exc: MalformedMessage) -> None:
        self._count("?", "?", "malformed")
        kind = "fanout" if queue == fanout_subject(self.target.topic) else "request"
        await _poison.settle(log, kind, queue, delivery, exc)

    def _continues(self, ctx: RequestContext) -> bool:
        """Whether a request carries the trace of one this server is running."""
        trace = ctx.trace_id
        return any(running.trace_id == trace for running in self._running_ctx.values())

    async def _decline(self, request: Request, delivery: Delivery, *, own: bool) -> None:
        """New work reached a draining server: give it back without running any of it."""
        self._count(KIND_NAMES[request.kind], request.method, "handed_back")
        if not own:
            await delivery.requeue()  # another server of the topic takes it
        elif request.kind == CALL:
            # Only this server (or its successor of the same name) may run it: tell the
            # caller it did not start, so the caller retries until the successor is up.
            await delivery.ack()
            draining = ServerDraining(
                f"server {self.name} is draining and did not start {request.method}",
                server=self.name,
                started=False,
            )
            await self._reply(request, failure=to_failure(draining, with_traceback=False))
        else:
            # A cast for this server waits in its queue for the successor; pausing before
            # handing it back keeps the broker from bouncing it while this server drains.
            await asyncio.sleep(DECLINE_PAUSE)
            await delivery.requeue()

    def _expired(self, request: Request) -> bool:
        deadline = request.ctx.deadline
        if deadline is None or time.time() < deadline:
            return False
        self._count(KIND_NAMES[request.kind], request.method, "expired")
        event(
            log,
            logging.INFO,
            "request.expired",
            server=self.name,
            method=request.method,
            request_id=request.ctx.request_id,
            late_s=round(time.time() - deadline, 3),
        )
        return True

    async def _do_call(  # noqa: PLR0912, PLR0915 - every call: _invoke and _reply inlined
        self, request: Request, delivery: Delivery, task: asyncio.Task[Any] | None = None
    ) -> None:
        """``task`` is the one running this (_handle knows it)."""
        # Acknowledged before the method runs (after the checks): a crash mid-call must never
        # lead a broker to run the call a second time elsewhere.
        await delivery.ack()
        deadline = request.ctx.deadline
        if deadline is not None and time.time() >= deadline and self._expired(request):
            return
        try:
            method = self._dispatcher.lookup(request.namespace, request.method, request.version)
        except KeelError as exc:
            self._count("call", request.method, "rejected")
            await self._reply(request, failure=to_failure(exc, with_traceback=False))
            return
        beats = self._heartbeats(request) if request.monitor else None
        try:
            if deadline is not None and method.is_async:
                # _invoke's path for an async method of a call with a deadline (every call a
                # Keel client makes), inlined: one coroutine fewer per call.
                ctx = request.ctx
                token = _context.current.set((self, ctx, request.method))
                try:
                    try:
                        coro = method.func(ctx, **request.args)
                    except TypeError as exc:
                        raise self._bad_arguments(method, request, exc) from None
                    if task is None:
                        task = asyncio.current_task()
                        assert task is not None
                    self._deadlines[task] = deadline
                    try:
                        result = await coro
                    except asyncio.CancelledError:
                        if self._deadline_cancelled(task):
                            raise _DeadlinePassed from None
                        raise
                    finally:
                        self._deadlines.pop(task, None)
                finally:
                    _context.current.reset(token)
            else:
                result = await self._invoke(method, request)
        except asyncio.CancelledError:
            if self._draining:
                draining = ServerDraining(
                    f"server {self.name} stopped while running {request.method}; it may have "
                    "run in part. Retry if the method is idempotent",
                    server=self.name,
                    started=True,
                    idempotent=method.options.idempotent,
                )
                await self._reply(request, failure=to_failure(draining, with_traceback=False))
            raise
        except _DeadlinePassed:
            # The caller has already given up: no reply.
            self._count("call", request.method, "deadline_exceeded")
            event(
                log,
                logging.WARNING,
                "call.deadline_exceeded",
                server=self.name,
                method=request.method,
                request_id=request.ctx.request_id,
            )
            return
        except Exception as exc:
            self._count("call", request.method, "error")
            if not isinstance(exc, KeelError):
                event(
                    log,
                    logging.INFO,
                    "call.raised",
                    server=self.name,
                    method=request.method,
                    error=repr(exc),
                )
            await self._reply(request, failure=to_failure(exc))
        else:
            ok = self._ok_calls
            ok[request.method] = ok.get(request.method, 0) + 1
            # _reply, inlined for a result that encodes (_reply turns one that does not into
            # the caller's error).
            reply_to = request.reply_to
            if reply_to is not None:
                try:
                    body = encode(
                        Reply(ENVELOPE_VERSION, request.id, result, None, self.name),
                        self.transport.max_message_bytes,
                    )
                except (SerializationError, MessageTooLarge):
                    await self._reply(request, result=result)
                else:
                    try:
                        if self._send_nowait is not None:
                            self._send_nowait(reply_to, body, durable=False)
                        else:
                            await self.transport.send(reply_to, body, durable=False)
                    except KeelError as exc:
                        self._undeliverable(request, exc)
        finally:
            if beats is not None:
                beats.cancel()

    def _heartbeats(self, request: Request) -> asyncio.Task[None]:
        # Held by the call that started it, which cancels it however the call ends.
        return asyncio.get_running_loop().create_task(self._beat(request))

    async def _beat(self, request: Request) -> None:
        """Tell a monitoring caller the method still runs, twice per window."""
        window = request.monitor
        if request.reply_to is None or window is None or not 0 < window < float("inf"):
            return  # a window from the wire is honoured only when it makes sense
        interval = max(window / 2, MIN_HEARTBEAT_INTERVAL)
        body = encode(
            Reply(ENVELOPE_VERSION, request.id, None, None, self.name, True),
            self.transport.max_message_bytes,
        )
        while True:
            await asyncio.sleep(interval)
            try:
                await self.transport.send(request.reply_to, body, durable=False)
            except KeelError as exc:  # the caller times out on its own if it hears none
                event(log, logging.INFO, "heartbeat.unsent", server=self.name, error=exc)

    def _count(self, kind: str, method: str, outcome: str) -> None:
        self.counts["keel_rpc_server_requests", kind, self._label(method), outcome] += 1

    def _label(self, method: str) -> str:
        return method if method in self._methods else "?"  # bounded, whatever senders send

    counts = _metrics.FoldedCounts("Requests handled, by (family, kind, method, outcome).")

    async def _do_cast(self, request: Request, delivery: Delivery) -> None:
        if self._expired(request):
            await delivery.ack()
            return
        if self._dedup.seen(request.id):
            self._count("cast", request.method, "duplicate")
            event(
                log,
                logging.INFO,
                "cast.duplicate",
                server=self.name,
                method=request.method,
                key=request.id,
            )
            await delivery.ack()
            return
        try:
            method = self._dispatcher.lookup(request.namespace, request.method, request.version)
            await self._invoke(method, request)
        except asyncio.CancelledError:
            await delivery.requeue()
            raise
        except Exception as exc:
            self._count("cast", request.method, "dead_lettered")
            event(
                log,
                logging.ERROR,
                "cast.dead_lettered",
                server=self.name,
                method=request.method,
                key=request.id,
                error=repr(exc),
            )
            await delivery.dead_letter(f"{type(exc).__name__}: {_poison.reason(exc)}")
            return
        self._dedup.remember(request.id)
        self._count("cast", request.method, "ok")
        await delivery.ack()

    async def _do_fanout(self, request: Request) -> None:
        if self._expired(request):
            return
        try:
            method = self._dispatcher.lookup(request.namespace, request.method, request.version)
            result = await self._invoke(method, request)
        except Exception as exc:
            self._count("fanout", request.method, "error")
            event(
                log,
                logging.ERROR,
                "fanout.failed",
                server=self.name,
                method=request.method,
                error=repr(exc),
            )
            return
        self._count("fanout", request.method, "ok")
        if result is not None:
            self._warn_once(
                "fanout-as-request",
                request.method,
                f"fanout method {request.method!r} returned a value that nobody receives: "
                "fanout is not a request; use call per server, or notifications",
            )

    def _warn_once(self, pattern: str, method: str, message: str) -> None:
        if (pattern, method) not in self._warned:
            self._warned.add((pattern, method))
            event(
                log,
                logging.WARNING,
                "anti_pattern",
                pattern=pattern,
                method=method,
                message=message,
            )

    async def _invoke(self, method: Method, request: Request) -> Any:
        ctx = request.ctx
        token = _context.current.set((self, ctx, request.method))
        try:
            if method.is_async:
                try:
                    coro = method.func(ctx, **request.args)
                except TypeError as exc:
                    raise self._bad_arguments(method, request, exc) from None
                if ctx.deadline is None or request.kind != CALL:
                    return await coro
                # A call's handler is cancelled at its deadline by the sweeper: cheaper than a
                # timer per call, and the caller has given up by then anyway.
                task = asyncio.current_task() if _RUNNING is None else _RUNNING.get(self._loop)
                assert task is not None
                self._deadlines[task] = ctx.deadline
                try:
                    return await coro
                except asyncio.CancelledError:
                    if self._deadline_cancelled(task):
                        raise _DeadlinePassed from None
                    raise
                finally:
                    self._deadlines.pop(task, None)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self._thread_pool_size, thread_name_prefix=f"keel-{self.target.topic}"
                )
            try:
                return await run_sync(self._executor, method.func, ctx, **request.args)
            except TypeError as exc:
                raise self._bad_arguments(method, request, exc) from None
        finally:
            _context.current.reset(token)

    @staticmethod
    def _bad_arguments(method: Method, request: Request, exc: TypeError) -> Exception:
        try:
            method.signature.bind(request.ctx, **request.args)
        except TypeError as bind_error:
            return InvalidArguments(
                f"{request.method}{method.signature}: {bind_error}", method=request.method
            )
        return exc  # the method's own TypeError, raised from inside it

    async def _reply(
        self, request: Request, *, result: Any = None, failure: Failure | None = None
    ) -> None:
        if request.reply_to is None:
            return
        limit = self.transport.max_message_bytes
        try:
            body = encode(Reply(ENVELOPE_VERSION, request.id, result, failure, self.name), limit)
        except (SerializationError, MessageTooLarge) as exc:
            body = encode(
                Reply(
                    ENVELOPE_VERSION,
                    request.id,
                    None,
                    to_failure(exc, with_traceback=False),
                    self.name,
                ),
                limit,
            )
        try:
            await self.transport.send(request.reply_to, body, durable=False)
        except KeelError as exc:
            self._undeliverable(request, exc)

    def _deadline_cancelled(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` was cancelled by the deadline sweeper (then it is uncancelled: the
        caller raises `_DeadlinePassed` instead)."""
        if task in self._expired_tasks:
            self._expired_tasks.discard(task)
            task.uncancel()
            return True
        return False

    def _undeliverable(self, request: Request, exc: KeelError) -> None:
        event(
            log,
            logging.INFO,
            "reply.undeliverable",
            server=self.name,
            method=request.method,
            error=exc,
        )
