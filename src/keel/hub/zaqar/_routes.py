"""The Zaqar v2 routes, mounted on the hub's app under ``/v2``."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from keel.hub._core import Hub
from keel.hub.zaqar._claims import Claims
from keel.hub.zaqar._config import ZaqarConfig
from keel.hub.zaqar._errors import Handler, guard
from keel.hub.zaqar._face import Face
from keel.hub.zaqar._messages import Messages
from keel.hub.zaqar._queues import Queues
from keel.hub.zaqar._subscriptions import Subscriptions


def zaqar_routes(hub: Hub, config: ZaqarConfig | None = None) -> list[BaseRoute]:
    face = Face(hub, config or ZaqarConfig())
    queues, messages = Queues(face), Messages(face)
    claims, subscriptions = Claims(face), Subscriptions(face)
    q = "/v2/queues/{queue_name}"
    table: list[tuple[str, Handler, list[str]]] = [
        ("/v2", queues.home, ["GET"]),
        ("/v2/", queues.home, ["GET"]),
        ("/v2/ping", queues.ping, ["GET", "HEAD"]),
        ("/v2/health", queues.health, ["GET"]),
        ("/v2/queues", queues.collection, ["GET"]),
        (q, queues.item, ["GET", "HEAD", "PUT", "PATCH", "DELETE"]),
        (q + "/stats", queues.stats, ["GET"]),
        (q + "/purge", queues.purge, ["POST"]),
        (q + "/share", queues.share, ["POST"]),
        (q + "/messages", messages.collection, ["GET", "POST", "DELETE"]),
        (q + "/messages/{message_id}", messages.item, ["GET", "DELETE"]),
        (q + "/claims", claims.create, ["POST"]),
        (q + "/claims/{claim_id}", claims.item, ["GET", "PATCH", "DELETE"]),
        (q + "/subscriptions", subscriptions.collection, ["GET", "POST"]),
        (q + "/subscriptions/{subscription_id}", subscriptions.item, ["GET", "PATCH", "DELETE"]),
        (q + "/subscriptions/{subscription_id}/confirm", subscriptions.confirm, ["PUT"]),
    ]
    return [Route(path, guard(h), methods=m) for path, h, m in table]
