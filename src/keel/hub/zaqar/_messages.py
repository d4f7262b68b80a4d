"""Zaqar v2 messages: post (batches, ``ttl``, ``delay``), list (``marker``, ``limit``,
``echo``, ``include_claimed``, ``include_delayed``), get by id and by ids, delete by id
(with ``claim_id``), by ids (with ``claim_ids``) and pop; and the same listing as an SSE
stream for browsers (``Accept: text/event-stream``, a Keel extension).

A post returns once its messages are committed (the hub's group commit, durable as any
ingest); deleting a message acks it in its queue (a Keel stream or replay sees it acked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from keel.errors import ClaimExpired, NotFound
from keel.hub._sse import EventStreamResponse, StreamCursor
from keel.hub.stores.base import Message, Routed, Subscription
from keel.hub.zaqar import _model
from keel.hub.zaqar._errors import BAD_BODY, ZaqarError, bad_request, not_found
from keel.hub.zaqar._face import Resource
from keel.hub.zaqar._queues import json, no_content
from keel.hub.zaqar._request import (
    Caller,
    body,
    bool_param,
    caller,
    decode,
    int_param,
    limit_param,
    list_param,
    queue_name,
    single,
)

DELETE_TITLE = "Unable to delete"
SCAN_ROUNDS = 5  # pages read to fill one listing when echo=false hides the caller's own


class _In(msgspec.Struct):
    body: msgspec.Raw = msgspec.Raw(b"")
    ttl: int | None = None
    delay: int | None = None


class _Post(msgspec.Struct):
    messages: list[_In] | None = None


class Messages(Resource):
    # --- collection -------------------------------------------------------------------------

    async def collection(self, request: Request) -> Response:
        if request.method == "POST":
            return await self._post(request)
        if request.method == "DELETE":
            return await self._delete_many(request)
        if "text/event-stream" in request.headers.get("accept", ""):
            return await self._stream(request)
        who = await self.who(request)
        name = queue_name(request)
        ids = list_param(request, "ids")
        sub = await self.face.queue(who, name)
        base = request.url.path.rsplit("/", 1)[0]
        now = self.face.now()
        if ids is not None:
            if not 0 < len(ids) <= self.face.config.max_messages_per_page:
                raise bad_request(
                    "Limit must be at least 1 and may not be greater than "
                    f"{self.face.config.max_messages_per_page}."
                )
            found = await self._by_ids(sub, ids)
            if not found:
                raise not_found(f"No messages with IDs: {ids[:20]} found in the queue {name}")
            return json({"messages": [_model.message_view(sub, base, m, now) for m in found]})  # type: ignore[arg-type]
        return json(await self._list(request, who, sub, base, now))

    async def _by_ids(self, sub: Subscription | None, ids: list[str]) -> list[Message]:
        if sub is None:
            return []
        seqs = sorted({s for i in ids if (s := _model.seq_of(sub, i)) is not None})
        if not seqs:
            return []
        return await self.face.hub.store.get_messages(sub.id, seqs, now=self.face.now())

    async def _list(
        self, request: Request, who: Caller, sub: Subscription | None, base: str, now: float
    ) -> dict[str, Any]:
        config = self.face.config
        limit = limit_param(request, config.max_messages_per_page)
        echo = bool_param(request, "echo")
        claimed = bool_param(request, "include_claimed")
        delayed = bool_param(request, "include_delayed")
        if sub is None:
            return {"messages": [], "links": []}
        marker = single(request, "marker")
        after = (_model.seq_of(sub, marker) or 0) if marker else 0
        found: list[Message] = []
        for _ in range(SCAN_ROUNDS):
            page = await self.face.hub.store.live(
                sub.id, after=after, limit=limit, now=now, claimed=claimed, delayed=delayed
            )
            for m in page:
                if echo or who.client_id is None or _model.unwrap(m)[1] != who.client_id:
                    found.append(m)
                if len(found) == limit:
                    break
            if len(found) == limit or len(page) < limit:
                break
            after = page[-1].seq
        if not found:
            return {"messages": [], "links": []}
        params: dict[str, Any] = {"marker": _model.message_id(sub, found[-1].seq), "limit": limit}
        for key, value in (("echo", echo), ("include_claimed", claimed)):
            if key in request.query_params:
                params[key] = "true" if value else "false"
        return {
            "messages": [_model.message_view(sub, base, m, now) for m in found],
            "links": [{"rel": "next", "href": f"{request.url.path}?{urlencode(params)}"}],
        }

    async def _post(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        config = self.face.config
        # Made (a lazy queue, a subscription write) only once the body is read and checked: a
        # refused post makes nothing and spends nothing.
        found = await self.face.queue(who, name)
        meta = _model.metadata_of(found) if found is not None else {}
        limit = config.max_messages_post_size
        own = meta.get("_max_messages_post_size")
        if isinstance(own, int) and not isinstance(own, bool) and own > 0:
            limit = min(limit, own)
        doc = decode(await body(request, limit), _Post)
        if doc.messages is None:
            raise bad_request("No messages were found in the request body.")
        if not doc.messages:
            raise bad_request("No messages to enqueue.")
        default_ttl = meta.get("_default_message_ttl") or config.default_message_ttl
        default_delay = meta.get("_default_message_delay") or 0
        checked: list[tuple[str, bytes, int, int]] = []
        for m in doc.messages:
            if len(m.body) == 0:
                raise bad_request('Missing "body" field.', BAD_BODY)
            ttl = default_ttl if m.ttl is None else m.ttl
            delay = default_delay if m.delay is None else m.delay
            if not 60 <= ttl <= config.max_message_ttl:
                raise bad_request(
                    f"The TTL for a message may not exceed {config.max_message_ttl} seconds, "
                    "and must be at least 60 seconds long."
                )
            if not 0 <= delay <= config.max_message_delay:
                raise bad_request(
                    f"The Delay TTL for a message may not exceed {config.max_message_delay} "
                    "seconds, and must be at least 0 seconds long."
                )
            event_id = uuid.uuid4().hex
            event = _model.posted_event(event_id, who.project, name, m.body, who.client_id)
            checked.append((event_id, event, ttl, delay))
        sub = found if found is not None else await self.face.ensure_queue(who, name)
        items = [
            Routed(event_id, event, (sub.id,), ttl=float(ttl), delay=float(delay))
            for event_id, event, ttl, delay in checked
        ]
        made = await self.face.hub.commit(items)
        ids = []
        for appended in made:
            seq = next((a.seq for a in appended if a.subscription == sub.id), None)
            if seq is None:  # the queue was deleted between the lookup and the commit
                raise not_found(f"Queue {name} does not exist for project {who.project}")
            ids.append(_model.message_id(sub, seq))
        path = request.url.path
        return json(
            {"resources": [f"{path}/{i}" for i in ids]},
            201,
            {"location": f"{path}?ids={','.join(ids)}"},
        )

    async def _delete_many(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        config = self.face.config
        ids = list_param(request, "ids")
        claim_ids = list_param(request, "claim_ids")
        pop = int_param(request, "pop")
        if pop is not None and ids is not None:
            raise bad_request("pop and id params cannot be present together in the delete request.")
        if pop is None and ids is None:
            raise bad_request(
                'The request should have either "ids" or "pop" parameter in the request, to '
                "be able to delete."
            )
        if config.message_delete_with_claim_id and (ids is None) != (claim_ids is None):
            raise bad_request(
                'The request should have both "ids" and "claim_ids" parameter in the request '
                "when message_delete_with_claim_id is True."
            )
        sub = await self.face.queue(who, name)
        if pop is not None:
            if not 0 < pop <= config.max_messages_per_claim_or_pop:
                raise bad_request(
                    "Pop value must be at least 1 and may not be greater than "
                    f"{config.max_messages_per_claim_or_pop}."
                )
            return json({"messages": await self._pop(sub, pop)})
        assert ids is not None
        if not 0 < len(ids) <= config.max_messages_per_page:
            raise bad_request(
                "ids parameter should have at least 1 and not greater than "
                f"{config.max_messages_per_page} values."
            )
        if sub is None:
            return no_content()
        found = await self._by_ids(sub, ids)
        now = self.face.now()
        store = self.face.hub.store
        if claim_ids is None:
            await store.delete_messages(
                sub.id, [m.seq for m in found], now=now, unclaimed_only=False
            )
            return no_content()
        await self._delete_held(sub, found, claim_ids)
        return no_content()

    async def _delete_held(
        self, sub: Subscription, found: list[Message], claim_ids: list[str]
    ) -> None:
        """Every listed message must be held by one of the listed claims (else nothing is
        deleted); then each claim acks its own."""
        now = self.face.now()
        wanted = set(claim_ids)
        for m in found:
            if not m.claimed(now) or m.claim_id not in wanted:
                raise ZaqarError(
                    403,
                    DELETE_TITLE,
                    f"message {_model.message_id(sub, m.seq)} is not held by a claim listed "
                    "in claim_ids",
                )
        for claim_id in wanted:
            seqs = [m.seq for m in found if m.claim_id == claim_id]
            if seqs:
                with contextlib.suppress(NotFound, ClaimExpired):  # expired meanwhile
                    await self.face.hub.store.ack(sub.id, claim_id, seqs, now=now)

    async def _pop(self, sub: Subscription | None, count: int) -> list[dict[str, Any]]:
        if sub is None:
            return []
        store = self.face.hub.store
        now = self.face.now()
        claim = await store.claim(
            sub.id, limit=count, ttl=60, now=now, max_deliveries=_model.max_claims(sub)
        )
        if claim is None:
            return []
        await store.ack(sub.id, claim.id, None, now=now)
        return [_model.popped_view(sub, m, now) for m in claim.messages]

    # --- one message ------------------------------------------------------------------------

    async def item(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        mid = request.path_params["message_id"]
        sub = await self.face.queue(who, name)
        found = await self._by_ids(sub, [mid])
        if request.method == "DELETE":
            return await self._delete_one(request, sub, found)
        if not found or sub is None:
            raise not_found(f"Message {mid} does not exist")
        base = request.url.path.rsplit("/", 2)[0]
        return json(_model.message_view(sub, base, found[0], self.face.now()))

    async def _delete_one(
        self, request: Request, sub: Subscription | None, found: list[Message]
    ) -> Response:
        if sub is None or not found:
            return no_content()
        message = found[0]
        store = self.face.hub.store
        now = self.face.now()
        claim_id = single(request, "claim_id")
        if claim_id is None:
            done = await store.delete_messages(sub.id, [message.seq], now=now, unclaimed_only=True)
            if done == 0 and message.claimed(now):
                raise ZaqarError(
                    403,
                    DELETE_TITLE,
                    "This message is claimed; it cannot be deleted without a valid claim ID.",
                )
            return no_content()
        if not message.claimed(now):
            raise ZaqarError(
                400,
                DELETE_TITLE,
                "A claim was specified, but the message is not currently claimed.",
            )
        try:
            if message.claim_id != claim_id:
                await store.get_claim(sub.id, claim_id, now=now)  # exists? else 400 below
                raise ZaqarError(
                    403,
                    DELETE_TITLE,
                    "This message is claimed; it cannot be deleted without a valid claim ID.",
                )
            await store.ack(sub.id, claim_id, [message.seq], now=now)
        except (NotFound, ClaimExpired):
            raise ZaqarError(
                400, DELETE_TITLE, "The specified claim does not exist or has expired."
            ) from None
        return no_content()

    # --- the browser's stream ---------------------------------------------------------------

    async def _stream(self, request: Request) -> Response:
        """The queue as Server-Sent Events (each message's stored event as ``data``), for an
        ``EventSource``: a token or a signed URL (headers, or the query parameters Heat's
        ``query_str`` uses); no ``Client-ID`` needed. Starts at the end of the queue, or after
        ``Last-Event-ID``; never claims or deletes."""
        who = await caller(request, self.face.hub, self.face.config, client_id=False)
        name = queue_name(request)
        resume = request.headers.get("last-event-id")
        # At most 18 digits: a sequence the stores' signed 64-bit columns can hold (a longer
        # one failed in the store, or in int() past 4300 digits, as a 500).
        if resume is not None and not (resume.isascii() and resume.isdigit() and len(resume) <= 18):
            raise bad_request("Last-Event-ID must be a sequence number")
        sub = await self.face.queue(who, name)
        if sub is None:
            raise not_found(f"Queue {name} does not exist for project {who.project}")
        fanout = self.face.hub.fanout
        client = fanout.join(sub.id)
        try:
            # Joined first, then the position read: nothing committed in between is lost.
            current = await self.face.hub.store.get_subscription(sub.id)
        except BaseException:
            fanout.leave(client)
            raise
        start = int(resume) if resume is not None else current.last_seq
        if who.expires_at is not None:
            # A signed URL grants until its expiry, an open stream included: ended then.
            loop = asyncio.get_running_loop()
            loop.call_later(max(0.0, who.expires_at - time.time()), client.close)
        cursor = StreamCursor(self.face.hub, sub.id, client, start)
        return EventStreamResponse(
            cursor,
            catch_up=resume is not None,
            # A signed URL is a capability, not a cookie: any page may hold one.
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "Access-Control-Allow-Origin": "*",
            },
        )
