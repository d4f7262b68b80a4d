"""`KeelDriver`: oslo.messaging's BaseDriver as a thin face over keel.messaging.

Every operation is the core's: ``send`` is `RPCClient.call`/``cast``/``fanout``, ``listen``
an `RPCServer`, notifications `OsloNotifier`/`OsloNotificationListener`. The driver maps
names (`_names`), contexts (`keel.messaging.oslo`) and errors (`_errors`) and runs the core
on Keel's one background event loop (`keel._portal`), which also runs inside eventlet's
monkey-patched world, where that loop is a green thread.

What oslo's parameters mean here:

* ``timeout``: the call's deadline, carried to the server, which never starts it late.
* ``call_monitor_timeout``: the core's call monitor; the server heartbeats every half window.
* ``retry``: how many times a send that failed to reach the broker (`TransportError`) is
  tried again (None or -1: until it works; for a call, until its timeout), then
  ``MessageDeliveryFailure``. A cast keeps one idempotency key across its attempts, so a
  server that already ran it skips the repeat. A call is sent again as a new request: if
  the broker took the first one before the connection broke, it may run twice, as with
  oslo's rabbit driver.
* ``?legacy=send|listen`` in the URL: oslo's rabbit RPC beside Keel's while a cloud moves
  off ``rabbit://`` (`_legacy`, docs/openstack.md).
* ``transport_options.at_least_once`` (RabbitMQ's "mandatory"): a call or cast raises
  ``MessageUndeliverable`` at once when no server of its target has announced itself
  (Keel's presence, heard within a second), instead of waiting in the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from oslo_messaging import exceptions as oslo_exceptions
from oslo_messaging._drivers import amqp as oslo_amqp
from oslo_messaging._drivers import base
from oslo_messaging._drivers import common as oslo_common
from oslo_serialization import jsonutils

from keel import urls
from keel._portal import portal
from keel.errors import TransportError
from keel.messaging import _presence
from keel.messaging._client import RPCClient
from keel.messaging._link import connect
from keel.messaging._target import Target
from keel.messaging.oslo import OsloNotifier, context_from_oslo
from keel.messaging.oslo_driver import _errors, _names
from keel.messaging.oslo_driver._legacy import Legacy
from keel.messaging.oslo_driver._notify import NotificationPoller
from keel.messaging.oslo_driver._rpc import RpcListener, primitive
from keel.messaging.transports.base import Transport
from keel.wire import RequestContext, new_id

T = TypeVar("T")

DEFAULT_TIMEOUT = 60.0  # oslo's rpc_response_timeout default, for a caller that gave none
RETRY_PAUSE = 0.2
RETRY_PAUSE_MAX = 2.0
PRESENCE_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """An oslo request as Keel sends it."""

    context: RequestContext
    method: str
    args: dict[str, Any]
    namespace: str | None
    version: str


class KeelDriver(base.BaseDriver):  # type: ignore[misc]  # oslo is untyped
    """oslo.messaging driver ``keel``: transport URLs ``keel+<keel scheme>://...``."""

    prefetch_size = 0

    def __init__(
        self,
        conf: Any,
        url: Any,
        default_exchange: str | None = None,
        allowed_remote_exmods: list[str] | None = None,
    ) -> None:
        super().__init__(conf, url, default_exchange, allowed_remote_exmods)
        self.options = _names.DriverOptions.from_oslo(url.transport, str(url), dict(url.query))
        urls.resolve("transport", self.options.url)  # a wrong scheme or extra fails here
        self.exchange: str = default_exchange or "openstack"
        conf.register_opts(oslo_amqp.amqp_opts, group="oslo_messaging_rabbit")
        # oslo declares its queues and exchanges durable only with this set; sharing them
        # on RabbitMQ means declaring them the same way.
        self.durable_queues = bool(conf.oslo_messaging_rabbit.amqp_durable_queues)
        self._portal = portal()
        self._rpc: Transport | None = None
        self._notify: dict[str, Transport] = {}
        self._notifiers: dict[str, OsloNotifier] = {}
        self._clients: dict[tuple[str, str, str | None], RPCClient] = {}
        self._lock: asyncio.Lock | None = None
        self.legacy = (
            Legacy(self.options.legacy, conf, url, default_exchange, self._allowed_remote_exmods)
            if self.options.legacy
            else None
        )

    # --- plumbing --------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on Keel's loop and wait (green-friendly under eventlet)."""
        return self._portal.run(coro)

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()  # created on the portal's loop, used only there
        return self._lock

    async def rpc_transport(self) -> Transport:
        if self._rpc is None:
            async with self._guard():
                if self._rpc is None:
                    self._rpc = await connect(self.options.url)
        return self._rpc

    async def notify_transport(self, exchange: str) -> tuple[Transport, str]:
        """The transport carrying ``exchange``'s notifications, and the topic prefix there."""
        if self.options.scheme not in _names.RABBIT_SCHEMES:
            return await self.rpc_transport(), f"{_names.escape(exchange)}:"
        found = self._notify.get(exchange)
        if found is None:
            async with self._guard():
                found = self._notify.get(exchange)
                if found is None:
                    url = self.options.with_exchange(exchange, durable=self.durable_queues)
                    found = self._notify[exchange] = await connect(url)
        return found, ""

    async def _client(self, target: Any) -> RPCClient:
        exchange = target.exchange or self.exchange
        key = (exchange, target.topic, target.server)
        client = self._clients.get(key)
        if client is None:
            keel_target = Target(
                _names.rpc_topic(exchange, target.topic),
                server=_names.escape(target.server) if target.server else None,
            )
            client = RPCClient(await self.rpc_transport(), keel_target, timeout=DEFAULT_TIMEOUT)
            self._clients[key] = client
        return client

    # --- BaseDriver --------------------------------------------------------------------------

    def require_features(self, requeue: bool = False) -> None:
        """Everything oslo asks for is there (requeue included)."""

    def send(  # noqa: PLR0917 - oslo's BaseDriver signature
        self,
        target: Any,
        ctxt: Any,
        message: dict[str, Any],
        wait_for_reply: bool | None = None,
        timeout: float | None = None,
        call_monitor_timeout: float | None = None,
        retry: int | None = None,
        transport_options: Any = None,
    ) -> Any:
        if self.legacy is not None and self.legacy.sends:  # moving off rabbit://: phase 1
            return self.legacy.driver.send(
                target,
                ctxt,
                message,
                wait_for_reply,
                timeout,
                call_monitor_timeout,
                retry,
                transport_options,
            )
        # Converted here, in the caller's thread: the event loop only sends.
        plain = ctxt if isinstance(ctxt, dict) else ctxt.to_dict()  # as oslo's pack_context
        outgoing = _Outgoing(
            context_from_oslo(plain, verbatim=True),
            message["method"],
            primitive(message.get("args") or {}),
            message.get("namespace"),
            _names.parse_version(message.get("version")),
        )
        return self.run(
            self._send(
                target,
                outgoing,
                message,
                wait_for_reply=bool(wait_for_reply),
                timeout=timeout,
                monitor=call_monitor_timeout,
                retry=retry,
                mandatory=bool(getattr(transport_options, "at_least_once", False)),
            )
        )

    async def _send(
        self,
        target: Any,
        outgoing: _Outgoing,
        message: dict[str, Any],
        *,
        wait_for_reply: bool,
        timeout: float | None,
        monitor: float | None,
        retry: int | None,
        mandatory: bool,
    ) -> Any:
        context, method, args = outgoing.context, outgoing.method, outgoing.args
        budget = timeout if timeout is not None else DEFAULT_TIMEOUT
        ends = time.monotonic() + budget
        key = new_id()  # a cast's idempotency key, the same for every attempt

        async def once() -> Any:
            client = await self._client(target)  # connects: a failure here is retried too
            if mandatory:
                await self._check_routable(client, target, message)
            prepared = client.prepare(
                namespace=outgoing.namespace, version=outgoing.version, monitor_timeout=monitor
            )
            if target.fanout:
                return await prepared.fanout(context, method, **args)
            if not wait_for_reply:
                return await prepared.prepare(idempotency_key=key).cast(context, method, **args)
            left = ends - time.monotonic()
            if left <= 0:
                raise oslo_exceptions.MessagingTimeout(
                    f"no reply to {target.topic}.{method} within {budget}s"
                )
            return await prepared.prepare(timeout=left).call(context, method, **args)

        try:
            return await self._with_retry(once, retry)
        except oslo_exceptions.MessagingException:
            raise
        except Exception as exc:
            remote = _errors.remote_to_oslo(exc, self._allowed_remote_exmods)
            raise (remote or _errors.local_to_oslo(exc)) from None

    async def _with_retry(self, op: Callable[[], Awaitable[T]], retry: int | None) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await op()
            except TransportError as exc:
                if retry is not None and retry >= 0 and attempt > retry:
                    raise _errors.delivery_failure(exc, attempt) from exc
                await asyncio.sleep(min(RETRY_PAUSE * attempt, RETRY_PAUSE_MAX))

    async def _check_routable(self, client: RPCClient, target: Any, message: Any) -> None:
        """RabbitMQ's mandatory flag, the Keel way: is a server of the target live?"""
        watch = _presence.watch(client.transport, client.target.topic)
        await watch.start()
        await watch.wait_heard(PRESENCE_WAIT)
        live = watch.servers()
        wanted = client.target.server
        if (wanted is None and live) or (wanted is not None and wanted in live):
            return
        where = f"server {target.server!r} of " if target.server else ""
        raise oslo_exceptions.MessageUndeliverable(
            TransportError(f"no live {where}topic {target.topic!r} (none announced itself)"),
            target.exchange or self.exchange,
            client.target.topic if wanted is None else f"{client.target.topic}.{wanted}",
            message,
        )

    def send_notification(
        self, target: Any, ctxt: Any, message: dict[str, Any], version: float, retry: Any = None
    ) -> None:
        # Exactly what oslo's rabbit driver writes, so oslo's own listeners read it too;
        # encoded here, in the caller's thread.
        msg = dict(message)
        oslo_amqp._add_unique_id(msg)
        oslo_amqp.pack_context(msg, ctxt)
        body = jsonutils.dump_as_bytes(oslo_common.serialize_msg(msg) if version == 2.0 else msg)
        self.run(self._send_notification(target, body, retry))

    async def _send_notification(self, target: Any, body: bytes, retry: Any) -> None:
        exchange = target.exchange or self.exchange
        notifier = self._notifiers.get(exchange)
        if notifier is None:
            transport, _ = await self.notify_transport(exchange)
            notifier = self._notifiers[exchange] = OsloNotifier(
                transport, "oslo.messaging", durable=self.durable_queues
            )
        subject = _names.notify_subject(self.options.scheme, exchange, target.topic)
        try:
            await self._with_retry(lambda: notifier.publish(subject, body), retry)
        except oslo_exceptions.MessagingException:
            raise
        except Exception as exc:
            raise _errors.local_to_oslo(exc) from None

    def listen(self, target: Any, batch_size: int, batch_timeout: Any) -> RpcListener:
        return RpcListener(self, target, batch_size, batch_timeout)

    def listen_for_notifications(
        self, targets_and_priorities: Any, pool: str | None, batch_size: int, batch_timeout: Any
    ) -> Any:
        poller = NotificationPoller(self, pool, batch_size)
        self.run(poller.start(targets_and_priorities))
        return base.PollStyleListenerAdapter(poller, batch_size, batch_timeout)

    def cleanup(self) -> None:
        if self.legacy is not None:
            self.legacy.cleanup()
        self.run(self._close())

    async def _close(self) -> None:
        transports = [*self._notify.values(), *([self._rpc] if self._rpc else [])]
        self._rpc = None
        self._notify.clear()
        self._notifiers.clear()
        self._clients.clear()
        for transport in transports:
            await transport.close()
