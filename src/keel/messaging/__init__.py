"""keel.messaging: RPC call / cast / fanout and notifications, one contract on every transport.

See docs/messaging-contract.md for what each pattern promises and docs/patterns.md for when
to use which.
"""

from keel.messaging._client import RPCClient
from keel.messaging._context import current_context
from keel.messaging._dedup import DedupStore, MemoryDedup, SQLiteDedup
from keel.messaging._endpoints import remote
from keel.messaging._link import connect
from keel.messaging._notify import (
    PRIORITIES,
    NotificationFilter,
    NotificationListener,
    NotificationResult,
    Notifier,
)
from keel.messaging._serve import Runner, serve
from keel.messaging._server import RPCServer, ServerState
from keel.messaging._target import Target
from keel.messaging.transports.base import Transport
from keel.wire import RequestContext

__all__ = [
    "PRIORITIES",
    "DedupStore",
    "MemoryDedup",
    "NotificationFilter",
    "NotificationListener",
    "NotificationResult",
    "Notifier",
    "RPCClient",
    "RPCServer",
    "RequestContext",
    "Runner",
    "SQLiteDedup",
    "ServerState",
    "Target",
    "Transport",
    "connect",
    "current_context",
    "remote",
    "serve",
]
