"""Keel as an oslo.messaging driver: ``transport_url = keel+rabbit://...`` (or ``keel+nats``,
``keel+redis``, ``keel+memory``) in an unchanged OpenStack service.

oslo.messaging loads the driver named before the ``+`` (entry point ``keel`` in the group
``oslo.messaging.drivers``); the driver runs everything on keel.messaging's core, so a
service gets Keel's contract (docs/messaging-contract.md) and its transports. What changes
for an operator, what improves and what differs: docs/openstack.md.
"""

from keel.messaging.oslo_driver._driver import KeelDriver

__all__ = ["KeelDriver"]
