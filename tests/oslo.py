"""The real oslo.messaging stack for interop tests, imported once and quietly."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice on import
    import oslo_messaging
    from oslo_config import cfg
    from oslo_context import context as oslo_context

__all__ = ["EXCHANGE", "notification_transport", "oslo_context", "oslo_messaging"]

EXCHANGE = "openstack"  # oslo.messaging's default control_exchange


@contextmanager
def notification_transport(url: str) -> Iterator[Any]:
    """oslo's notification transport on ``url``, as a service configures it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg.CONF([], project="keel-tests")
        transport = oslo_messaging.get_notification_transport(cfg.CONF, url=url)
    try:
        yield transport
    finally:
        transport.cleanup()
