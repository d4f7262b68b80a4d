"""keel.hub: notifications to users through filtered subscriptions and durable queues.

See docs/hub-api.md for the contract (delivery per subscription queue, claims, retention and
gap events, tenancy, errors).
"""

from keel.hub._auth import Authenticator, KeystoneTokens, Principal, StaticTokens, new_token
from keel.hub._core import Hub, SubscriptionSpec
from keel.hub._events import CloudEvent, decode_event, encode_event, from_notification
from keel.hub._filters import compile_filter
from keel.hub._ingest import listener
from keel.hub._oslo_ingest import oslo_listener, oslo_url
from keel.hub._server import HubServer
from keel.hub.stores import SQLiteStore, Store

__all__ = [
    "Authenticator",
    "CloudEvent",
    "Hub",
    "HubServer",
    "KeystoneTokens",
    "Principal",
    "SQLiteStore",
    "StaticTokens",
    "Store",
    "SubscriptionSpec",
    "compile_filter",
    "decode_event",
    "encode_event",
    "from_notification",
    "listener",
    "new_token",
    "oslo_listener",
    "oslo_url",
]
