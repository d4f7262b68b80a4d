"""Zaqar v2 claims: create (``ttl``, ``grace``, ``?limit``: 201 with Location and the
messages, 204 when there is nothing to claim), get, update (``ttl``, ``grace``: 204) and
release (delete: 204, also for a claim that is gone). A claim is a store claim: its messages
are in no other live claim, and come back when it expires or is released."""

from __future__ import annotations

import contextlib

from starlette.requests import Request
from starlette.responses import Response

from keel.errors import ClaimExpired, Conflict, NotFound
from keel.hub.zaqar import _model
from keel.hub.zaqar._errors import CONFLICT, ZaqarError, not_found
from keel.hub.zaqar._face import Resource
from keel.hub.zaqar._queues import json, no_content
from keel.hub.zaqar._request import (
    body,
    checked_int,
    json_object,
    limit_param,
    queue_name,
)


class Claims(Resource):
    def _times(self, doc: dict[str, object]) -> tuple[int, int]:
        c = self.face.config
        ttl = checked_int(doc, "ttl", c.default_claim_ttl, 60, c.max_claim_ttl)
        grace = checked_int(doc, "grace", c.default_claim_grace, 60, c.max_claim_grace)
        return ttl, grace

    async def create(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        config = self.face.config
        limit = limit_param(request, config.max_messages_per_claim_or_pop)
        ttl, grace = self._times(json_object(await body(request, config.max_queue_metadata)))
        sub = await self.face.queue(who, name)
        if sub is None:
            return no_content()
        if sub.webhook is not None:
            raise ZaqarError(
                409, CONFLICT, "this queue is delivered by its webhook; it cannot be claimed"
            )
        now = self.face.now()
        try:
            claim = await self.face.hub.store.claim(
                sub.id,
                limit=limit,
                ttl=ttl,
                grace=grace,
                now=now,
                max_deliveries=_model.max_claims(sub),
            )
        except NotFound:
            claim = None  # deleted meanwhile
        if claim is None:
            return no_content()
        base = request.url.path.rsplit("/", 1)[0]
        messages = [_model.message_view(sub, base, m, now, claim.id) for m in claim.messages]
        return json({"messages": messages}, 201, {"location": f"{request.url.path}/{claim.id}"})

    async def item(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        claim_id = request.path_params["claim_id"]
        sub = await self.face.queue(who, name)
        store = self.face.hub.store
        now = self.face.now()
        if request.method == "DELETE":
            if sub is not None:
                with contextlib.suppress(NotFound, ClaimExpired, Conflict):
                    await store.release(sub.id, claim_id, now=now)
            return no_content()
        if request.method == "PATCH":
            ttl, grace = self._times(
                json_object(await body(request, self.face.config.max_queue_metadata))
            )
            if sub is None:
                raise not_found(f"Claim {claim_id} does not exist")
            try:
                await store.extend(sub.id, claim_id, ttl=ttl, grace=grace, now=now)
            except (NotFound, ClaimExpired):
                raise not_found(f"Claim {claim_id} does not exist or has expired") from None
            return no_content()
        if sub is None:
            raise not_found(f"Claim {claim_id} does not exist")
        try:
            claim = await store.get_claim(sub.id, claim_id, now=now)
        except (NotFound, ClaimExpired):
            raise not_found(f"Claim {claim_id} does not exist or has expired") from None
        base = request.url.path.rsplit("/", 2)[0]
        return json(
            {
                "age": int(now - claim.created_at),
                "ttl": int(claim.ttl),
                "messages": [
                    _model.message_view(sub, base, m, now, claim_id) for m in claim.messages
                ],
                "href": request.url.path,
            }
        )
