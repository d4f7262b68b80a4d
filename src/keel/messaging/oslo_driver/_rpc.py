"""oslo.messaging RPC servers on a Keel `RPCServer`.

An oslo RPC server's listener is a Keel RPCServer on the target's Keel topic and server
name whose dispatcher hands every request to oslo (the message dict oslo's dispatcher
reads, the caller's context dict) and waits for oslo's ``reply()``. So the delivery rules
are Keel's, not the framework's (docs/messaging-contract.md):

* a call is acknowledged when it starts; a cast after oslo's endpoint returned (at least
  once, deduplicated by key), dead-lettered with the reason if it raised, never dropped;
  a request past its deadline is never started;
* heartbeats for ``call_monitor_timeout`` come from Keel's server while the request is in
  oslo's hands (oslo's watchdog thread is not started);
* ``stop()`` is Keel's drain: no new work is taken, what the broker or this server holds
  unstarted goes back for the other servers of the topic, what oslo already runs finishes
  (up to the URL's ``drain_timeout``, then its callers get ``ServerDraining``); ``wait()``
  then finds oslo's executor idle. A later ``start()`` serves again.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from oslo_messaging._drivers import base
from oslo_serialization import jsonutils

from keel.messaging._endpoints import Dispatcher, Method, RemoteOptions
from keel.messaging._server import RPCServer
from keel.messaging._target import Target
from keel.messaging.oslo import context_to_oslo
from keel.messaging.oslo_driver import _names
from keel.wire import RequestContext

if TYPE_CHECKING:
    from keel.messaging.oslo_driver._driver import KeelDriver


def primitive(value: Any) -> Any:
    """What oslo's JSON encoding would deliver (datetimes as strings, tuples as lists...)."""
    return jsonutils.to_primitive(value, convert_instances=True)


async def _forward_signature(ctx: RequestContext, /, **args: Any) -> Any: ...


_SIGNATURE = inspect.signature(_forward_signature)
_OPTIONS = RemoteOptions()


class _Forwarder(Dispatcher):
    """Every (namespace, method, version) is oslo's to find: hand the request over."""

    def __init__(self, listener: RpcListener) -> None:
        super().__init__([])
        self._listener = listener

    def lookup(self, namespace: str | None, name: str, version: str) -> Method:
        # Not cached: names come from callers, and oslo's dispatcher answers for unknown ones.
        hand_over = self._listener.hand_over

        async def forward(ctx: RequestContext, /, **args: Any) -> Any:
            return await hand_over(ctx, name, args, namespace, version)

        return Method(name, forward, True, _SIGNATURE, _OPTIONS, (0, 0))

    def namespaces(self) -> dict[str | None, tuple[int, int]]:
        return {}  # oslo's endpoints are not known here; version caps are oslo's own

    def method_names(self) -> list[str]:
        return []


def _settle(future: asyncio.Future[Any], result: Any, failure: BaseException | None) -> None:
    if future.done():  # the call's deadline passed and Keel gave up on it
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


class _Incoming(base.RpcIncomingMessage):  # type: ignore[misc]  # oslo is untyped
    """One request in oslo's hands; ``reply()`` (from an oslo worker thread) answers it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
        ctxt: dict[str, Any],
        message: dict[str, Any],
        msg_id: str,
    ) -> None:
        super().__init__(ctxt, message, msg_id)
        self._loop = loop
        self._future = future
        # Keel's server sends the call-monitor heartbeats: no watchdog thread per call.
        self.client_timeout = None

    def acknowledge(self) -> None:
        """Keel settles the delivery itself (see the module docstring)."""

    def requeue(self) -> None:
        """Not used for RPC by oslo.messaging; Keel decides what goes back."""

    def heartbeat(self) -> None:
        """Keel's server sends the heartbeats."""

    def reply(self, reply: Any = None, failure: Any = None) -> None:
        if failure is not None:
            exc = failure[1] if isinstance(failure, tuple) else failure
            self._loop.call_soon_threadsafe(_settle, self._future, None, exc)
            return
        try:
            result = primitive(reply)
        except Exception as exc:  # not serializable: the caller gets the error
            self._loop.call_soon_threadsafe(_settle, self._future, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, self._future, result, None)


class RpcListener(base.Listener):  # type: ignore[misc]  # oslo is untyped
    """The listener oslo's RPC server starts and stops; see the module docstring."""

    def __init__(self, driver: KeelDriver, target: Any, batch_size: int, batch_timeout: Any):
        super().__init__(batch_size, batch_timeout, driver.prefetch_size)
        self._driver = driver
        self._target = Target(
            _names.rpc_topic(target.exchange or driver.exchange, target.topic),
            server=_names.escape(target.server) if target.server else None,
        )
        self._server: RPCServer | None = None
        self._hand: Callable[[list[Any]], None] | None = None
        # While a cloud moves off rabbit://, oslo's own rabbit listener for the same target.
        self._legacy = (
            driver.legacy.listen(target, batch_size, batch_timeout) if driver.legacy else None
        )

    async def hand_over(
        self,
        ctx: RequestContext,
        method: str,
        args: dict[str, Any],
        namespace: str | None,
        version: str,
    ) -> Any:
        hand = self._hand
        if hand is None:  # stopped before this request reached oslo
            raise RuntimeError("the oslo.messaging server was stopped")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        message: dict[str, Any] = {"method": method, "args": args, "version": version}
        if namespace is not None:
            message["namespace"] = namespace
        hand([_Incoming(loop, future, context_to_oslo(ctx), message, ctx.request_id)])
        return await future

    def start(self, on_incoming_callback: Callable[[list[Any]], None]) -> None:
        super().start(on_incoming_callback)
        self._hand = on_incoming_callback
        self._server = self._driver.run(self._start())
        if self._legacy is not None:
            self._legacy.start(on_incoming_callback)

    async def _start(self) -> RPCServer:
        transport = await self._driver.rpc_transport()
        size = getattr(self._driver.conf, "executor_thread_pool_size", 64)
        server = RPCServer(
            transport,
            self._target,
            [],
            dispatcher=_Forwarder(self),
            # As many requests in flight as oslo has worker threads: each gets one at once.
            max_concurrency=size,
            stop_timeout=self._driver.options.drain_timeout,
            service=self._target.topic,
        )
        await server.start()
        return server

    def stop(self) -> None:
        if self._legacy is not None:
            self._legacy.stop()
        server = self._server
        if server is not None:
            self._driver.run(server.drain())
            self._server = None
        self._hand = None
        super().stop()

    def cleanup(self) -> None:
        """``stop()`` drained the server; the connection is the driver's."""
        if self._legacy is not None:
            self._legacy.cleanup()
