"""The Zaqar face's state and the lookups every resource shares: queues by name, a queue's
Zaqar subscriptions, lazy creation, and the spec a queue's metadata asks for.

Everything here translates: queues, claims, tees and webhooks are the hub core's and the
store's, with the core's guarantees (group commit, tenancy, quotas, SSRF policy).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from keel.errors import BadRequest, Conflict
from keel.hub._core import Hub, filter_fields, parse_spec
from keel.hub.stores.base import Subscription
from keel.hub.zaqar import _model
from keel.hub.zaqar._config import ZaqarConfig
from keel.hub.zaqar._errors import BAD_BODY, bad_request
from keel.hub.zaqar._request import Caller, caller

_FILTER_KEYS = {"types", "source", "subject", "priority", "filters"}
_PAGE = 200


class Face:
    def __init__(self, hub: Hub, config: ZaqarConfig) -> None:
        self.hub = hub
        self.config = config

    def now(self) -> float:
        return self.hub.clock()

    async def queue(self, who: Caller, name: str) -> Subscription | None:
        return await _model.find_queue(self.hub, who.project, name)

    async def ensure_queue(self, who: Caller, name: str, *, counted: bool = False) -> Subscription:
        """The queue, created (without metadata) if it does not exist, as Zaqar's lazy
        queues are on a post or a new subscription. Creating it is a subscription write
        (`Hub.count_writes`) unless ``counted``."""
        sub = await self.queue(who, name)
        if sub is not None:
            return sub
        if name.startswith("sub-"):
            raise bad_request(
                f"no Keel subscription {name!r} in your project; queue names starting with "
                "'sub-' are Keel subscriptions' queues and are not created through this API"
            )
        sub = _model.new_queue(
            self.config,
            project=who.project,
            user=who.principal.user,
            name=name,
            metadata={},
            spec=_model.NEVER,
            now=self.now(),
        )
        try:
            await self.hub.add_subscription(sub, counted=counted)
        except Conflict:  # created meanwhile, by another request or hub process
            again = await self.queue(who, name)
            if again is None:
                raise
            return again
        return sub

    async def tees(self, project: str, queue: str) -> list[Subscription]:
        """The queue's Zaqar subscriptions, in id order (one range of the store's ids)."""
        prefix = _model.tee_prefix(project, queue)
        out: list[Subscription] = []
        marker = prefix
        while True:
            page = await self.hub.store.list_subscriptions(project, limit=_PAGE, marker=marker)
            mine = [s for s in page if s.id.startswith(prefix)]
            out += mine
            if len(mine) < len(page) or len(page) < _PAGE:
                return out
            marker = page[-1].id


class Resource:
    """A group of routes over the face."""

    def __init__(self, face: Face) -> None:
        self.face = face

    async def who(self, request: Request) -> Caller:
        return await caller(request, self.face.hub, self.face.config)


def spec_for(metadata: dict[str, Any]) -> dict[str, Any]:
    """The filter a queue's ``_keel_filter`` metadata asks for (the cloud's events of the
    queue's project that match it), or one that matches nothing."""
    wanted = metadata.get(_model.KEEL_FILTER)
    if wanted is None:
        return _model.NEVER
    if not isinstance(wanted, dict) or set(wanted) - _FILTER_KEYS:
        raise bad_request(
            f"{_model.KEEL_FILTER} must be an object with some of {sorted(_FILTER_KEYS)} "
            "(a Keel subscription filter, see docs/hub-api.md)",
            BAD_BODY,
        )
    try:
        return filter_fields(parse_spec(wanted))
    except BadRequest as exc:
        raise bad_request(f"{_model.KEEL_FILTER}: {exc.message}", BAD_BODY) from None


def check_metadata(metadata: dict[str, Any], config: ZaqarConfig) -> None:
    """Zaqar's ``queue_metadata_putting``: the reserved attributes' types and ranges."""

    def integer(key: str, low: int, high: int) -> None:
        value = metadata.get(key)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{key} must be integer.", BAD_BODY)
        if not low <= value <= high:
            raise bad_request(f"{key} must be {low}..{high}.", BAD_BODY)

    integer("_default_message_ttl", 60, config.max_message_ttl)
    integer("_max_messages_post_size", 1, config.max_messages_post_size)
    integer("_max_claim_count", 1, 2**31)
    integer("_dead_letter_queue_messages_ttl", 60, config.max_message_ttl)
    integer("_default_message_delay", 0, config.max_message_delay)
    encrypted = metadata.get("_enable_encrypt_messages", False)
    if not isinstance(encrypted, bool):
        raise bad_request("_enable_encrypt_messages must be boolean.", BAD_BODY)
    if encrypted:
        raise bad_request(
            "_enable_encrypt_messages is not supported by this server (messages are stored "
            "as sent; encrypt the body yourself)",
            BAD_BODY,
        )
    spec_for(metadata)
