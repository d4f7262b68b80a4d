"""Moving a running cloud from oslo's ``rabbit://`` to ``keel+rabbit://`` without a stop.

Keel's RPC and oslo's rabbit RPC cannot share a topic: oslo's rabbit driver puts JSON
envelopes on queues named after the topic, Keel msgpack envelopes on ``keel.rpc.*`` queues.
So during the move a service on Keel's driver also speaks oslo's rabbit RPC, through oslo's
own rabbit driver on the same broker, chosen by ``?legacy=`` in its transport URL:

* ``legacy=send``: its RPC servers listen on both (Keel's queues and oslo's), its clients
  send through oslo's rabbit driver, so services still on ``rabbit://`` reach it and it
  reaches them (phase 1: every service is restarted once with this).
* ``legacy=listen``: servers still listen on both, clients send through Keel; safe once
  every service listens on Keel's queues too (phase 2: every service restarted again).
* no ``legacy``: Keel only (phase 3, once no service sends through oslo's rabbit any more).

Notifications need none of this on RabbitMQ: Keel's driver writes oslo's format to oslo's
exchange and queues, so notifiers and listeners of both drivers see each other's. The
procedure and the rollback are in docs/openstack.md.
"""

from __future__ import annotations

from typing import Any

from oslo_messaging import transport as oslo_transport
from oslo_messaging._drivers import impl_rabbit

from keel.errors import ConfigError
from keel.messaging.oslo_driver import _names

MODES = ("send", "listen")


class Legacy:
    """oslo's rabbit driver for the same broker, beside Keel's (see the module docstring)."""

    def __init__(
        self,
        mode: str,
        conf: Any,
        url: Any,
        default_exchange: str | None,
        allowed_remote_exmods: list[str],
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"legacy={mode!r}: use legacy=send or legacy=listen")
        scheme = url.transport.partition("+")[2].lower()
        if scheme not in _names.RABBIT_SCHEMES:
            raise ConfigError(
                f"legacy={mode} moves services off oslo's rabbit driver; it needs "
                f"keel+rabbit://, not keel+{scheme}://"
            )
        query = {k: v for k, v in url.query.items() if k not in _names.DRIVER_OPTIONS}
        rabbit_url = oslo_transport.TransportURL(conf, "rabbit", url.virtual_host, url.hosts, query)
        self.sends = mode == "send"
        self.driver = impl_rabbit.RabbitDriver(
            conf, rabbit_url, default_exchange, allowed_remote_exmods
        )

    def listen(self, target: Any, batch_size: int, batch_timeout: Any) -> Any:
        return self.driver.listen(target, batch_size, batch_timeout)

    def cleanup(self) -> None:
        self.driver.cleanup()
