"""Zaqar v2 subscriptions: an http(s) subscriber gets every message of a queue, POSTed.

A subscription is a hub subscription that tees off the queue's and is delivered by the
hub's webhook dispatcher, so it has the webhooks' guarantees: signed (Standard Webhooks
headers, keyed by the ``secret`` shown in the subscription), the SSRF policy at creation and
at every connection, in order, at least once, retried on the webhook schedule and kept in
the store across restarts, dead-lettered after ``max_deliveries``. The body is Zaqar's:
the message as posted (``body``, ``ttl``) with ``queue_name`` and ``Message_Type``, or
``options.post_data`` with ``"$zaqar_message$"`` replaced by it, as ``application/json``:
it is not a CloudEvent, so no CloudEvents content mode applies and no ``ce-*`` header is
sent. ``options.post_headers`` are added (never ones that would change the request's
framing or its signature, nor ``ce-*`` ones that would make it look like an event).

With ``require_confirmation`` a new subscriber first gets Zaqar's confirmation notice (a
signed URL to ``PUT .../confirm``) and nothing else until it confirms; ``confirmed: false``
stops its deliveries again. A subscription past its ``ttl`` is gone.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from keel.errors import NotFound
from keel.hub._webhooks import check_form, new_secret
from keel.hub.stores.base import Message, Routed, Subscription, Webhook, quota_exceeded
from keel.hub.zaqar import _model, _signed
from keel.hub.zaqar._errors import BAD_BODY, CONFLICT, ZaqarError, bad_request, not_found
from keel.hub.zaqar._face import Face, Resource
from keel.hub.zaqar._queues import json, no_content
from keel.hub.zaqar._request import (
    Caller,
    body,
    json_object,
    limit_param,
    queue_name,
    single,
)

RENDER = "zaqar"
# Zaqar takes any TTL whose expiry a datetime can hold (Heat asks for 220367260800 s).
MAX_TTL = 250_000_000_000
_KEYS = {"subscriber", "ttl", "options"}
_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")
_FORBIDDEN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-type"}
_encode = msgspec.json.Encoder().encode


class Subscriptions(Resource):
    def __init__(self, face: Face) -> None:
        super().__init__(face)
        face.hub.webhooks.renderers[RENDER] = render

    def _check(self, doc: dict[str, Any], *, creating: bool) -> None:
        if not doc:
            raise bad_request("No subscription to create.")
        unknown = set(doc) - _KEYS
        if unknown:
            raise bad_request(f"Unknown keys: {sorted(unknown)}")
        if creating and "subscriber" not in doc:
            raise bad_request("Missing parameter subscriber in body.")
        subscriber = doc.get("subscriber")
        if "subscriber" in doc and (
            not isinstance(subscriber, str) or urlsplit(subscriber).scheme not in ("http", "https")
        ):
            raise bad_request(
                "The subscriber type of subscription must be supported in the list "
                "['http', 'https'] (this server delivers no mailto: or trust+ subscribers)."
            )
        options = doc.get("options")
        if options is not None and not isinstance(options, dict):
            raise bad_request("Options must be a dict.")
        ttl = doc.get("ttl")
        if ttl is not None:
            if isinstance(ttl, bool) or not isinstance(ttl, int):
                raise bad_request("TTL must be an integer.")
            if not 60 <= ttl <= MAX_TTL:
                raise bad_request(f"The TTL for a subscription must be 60..{MAX_TTL} seconds.")

    async def _target(self, url: str) -> None:
        # The form only (and non-public address literals): names are checked when connecting.
        check_form(url, allow_private=self.face.hub.allow_private_webhooks)

    def _active(self, confirmed: bool) -> bool:
        return confirmed or not self.face.config.require_confirmation

    async def collection(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        if request.method == "POST":
            return await self._create(request, who, name)
        config = self.face.config
        limit = limit_param(request, config.max_subscriptions_per_page)
        marker = single(request, "marker") or ""
        now = self.face.now()
        tees = [
            t
            for t in await self.face.tees(who.project, name)
            if _zid(t) > marker and not _expired(t, now)
        ][:limit]
        links = []
        if tees:
            params = urlencode({"marker": _zid(tees[-1]), "limit": limit})
            links = [{"rel": "next", "href": f"{request.url.path}?{params}"}]
        return json({"subscriptions": [_view(t, now) for t in tees], "links": links})

    async def _create(self, request: Request, who: Caller, name: str) -> Response:
        doc = json_object(await body(request, self.face.config.max_queue_metadata))
        self._check(doc, creating=True)
        url: str = doc["subscriber"]
        await self._target(url)
        # The queue (if new) and the tee are two writes: both are counted before either is
        # made, so a refusal leaves no queue behind.
        queue = await self.face.queue(who, name)
        made = queue is None
        hub = self.face.hub
        await hub.count_writes(who.project, 2 if made else 1)
        if queue is None:
            quota = hub.quota_subscriptions
            if await hub.store.count_subscriptions(who.project) + 2 > quota:
                raise quota_exceeded(who.project, quota)  # the queue and its tee: two
            queue = await self.face.ensure_queue(who, name, counted=True)
        now = self.face.now()
        for tee in await self.face.tees(who.project, name):
            if tee.meta.get("subscriber") == url and not _expired(tee, now):
                if self._active(bool(tee.meta.get("confirmed"))):
                    raise ZaqarError(
                        409,
                        CONFLICT,
                        "Such subscription already exists. Subscriptions are unique by "
                        "project + queue + subscriber URI.",
                        headers={"location": request.url.path},
                    )
                await self._notice(tee, confirm=True)
                return json(_created(tee), 201, {"location": request.url.path})
        ttl = doc.get("ttl") or self.face.config.default_subscription_ttl
        zid = uuid.uuid4().hex
        tee = Subscription(
            id=_model.tee_prefix(who.project, name) + zid,
            project=who.project,
            user=who.principal.user,
            spec=_model.NEVER,
            parent=queue.id if self._active(False) else None,
            expires_at=now + ttl,
            webhook=Webhook(url, new_secret(), render=RENDER),
            created_at=now,
            meta={
                "kind": _model.SUBSCRIPTION,
                "queue": name,
                "queue_id": queue.id,
                "subscriber": url,
                "options": doc.get("options") or {},
                "ttl": ttl,
                "confirmed": False,
            },
        )
        try:
            await hub.add_subscription(tee, counted=True)
        except Exception:
            if made:  # a create that raced past the count above: take back the queue it made
                with contextlib.suppress(NotFound):
                    await hub.delete_subscription(who.principal, queue.id)
            raise
        await self._notice(tee, confirm=True)
        return json(_created(tee), 201, {"location": request.url.path})

    async def _notice(self, tee: Subscription, *, confirm: bool) -> None:
        """Queue Zaqar's (un)subscribe confirmation notice for the subscriber (only where
        confirmation is required), ahead of anything else it gets."""
        config = self.face.config
        if not config.require_confirmation:
            return
        name = tee.meta["queue"]
        path = f"/v2/queues/{name}/subscriptions/{_zid(tee)}/confirm"
        expires = tee.expires_at or (self.face.now() + config.default_subscription_ttl)
        stamp = datetime.fromtimestamp(expires, UTC).strftime(_signed.DATE_FORMAT)
        signed = _signed.sign(
            config.secret_key, [path], project=tee.project, methods=["PUT"], expires=stamp
        )
        notice: dict[str, Any] = {}
        if config.public_url:
            notice["WSGISubscribeURL"] = config.public_url.rstrip("/") + path
        notice.update(
            {
                "Message_Type": "SubscriptionConfirmation"
                if confirm
                else "UnsubscribeConfirmation",
                "Message": (
                    f"You have chosen to subscribe to the queue: {name}"
                    if confirm
                    else f"You have unsubscribed successfully to the queue: {name}, you can "
                    "resubscribe it by using confirmed=True."
                ),
                "URL-Signature": signed.signature,
                "URL-Methods": signed.methods[0],
                "URL-Paths": signed.paths[0],
                "X-Project-ID": signed.project,
                "URL-Expires": signed.expires,
                "SubscribeBody": {"confirmed": True},
                "UnsubscribeBody": {"confirmed": False},
            }
        )
        event_id = uuid.uuid4().hex
        event = _model.notice_event(event_id, tee.project, name, notice)
        await self.face.hub.commit([Routed(event_id, event, (tee.id,))])

    async def _find(self, who: Caller, name: str, zid: str) -> Subscription | None:
        sub_id = _model.tee_prefix(who.project, name) + zid
        tee = self.face.hub.known(sub_id)
        if tee is None:
            try:
                tee = await self.face.hub.store.get_subscription(sub_id)
            except NotFound:
                return None
        if tee.project != who.project or _expired(tee, self.face.now()):
            return None
        return tee

    async def item(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        zid = request.path_params["subscription_id"]
        tee = await self._find(who, name, zid)
        if request.method == "DELETE":
            if tee is not None:
                with contextlib.suppress(NotFound):
                    await self.face.hub.delete_subscription(who.principal, tee.id)
            return no_content()
        if tee is None:
            raise not_found(f"Subscription {zid[:64]} does not exist")
        if request.method == "GET":
            return json(_view(tee, self.face.now()))
        doc = json_object(await body(request, self.face.config.max_queue_metadata))
        self._check(doc, creating=False)
        meta = dict(tee.meta)
        webhook = tee.webhook
        now = self.face.now()
        if "subscriber" in doc and doc["subscriber"] != meta["subscriber"]:
            url = doc["subscriber"]
            for other in await self.face.tees(who.project, name):
                if other.meta.get("subscriber") == url and not _expired(other, now):
                    raise ZaqarError(409, CONFLICT, "a subscription with that subscriber exists")
            await self._target(url)
            meta["subscriber"] = url
            assert webhook is not None
            webhook = Webhook(url, webhook.secret, render=RENDER)
        if "options" in doc:
            meta["options"] = doc["options"] or {}
        expires_at = tee.expires_at
        if "ttl" in doc:
            meta["ttl"] = doc["ttl"]
            expires_at = now + doc["ttl"]
        new = msgspec.structs.replace(tee, meta=meta, webhook=webhook, expires_at=expires_at)
        await self.face.hub.update_subscription(new)
        return no_content({"location": request.url.path})

    async def confirm(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        zid = request.path_params["subscription_id"]
        doc = json_object(await body(request, self.face.config.max_queue_metadata))
        confirmed = doc.get("confirmed")
        if not isinstance(confirmed, bool):
            raise bad_request("The 'confirmed' should be boolean.", BAD_BODY)
        tee = await self._find(who, name, zid)
        if tee is None:
            raise not_found(f"Subscription {zid[:64]} does not exist")
        new = msgspec.structs.replace(
            tee,
            meta={**tee.meta, "confirmed": confirmed},
            parent=tee.meta["queue_id"] if self._active(confirmed) else None,
        )
        await self.face.hub.update_subscription(new)
        if not confirmed:
            await self._notice(new, confirm=False)
        return no_content({"location": request.url.path})


def _zid(tee: Subscription) -> str:
    return tee.id.rsplit(":", 1)[-1]


def _expired(tee: Subscription, now: float) -> bool:
    return tee.expires_at is not None and tee.expires_at <= now


def _created(tee: Subscription) -> dict[str, Any]:
    assert tee.webhook is not None
    return {"subscription_id": _zid(tee), "secret": tee.webhook.secret}


def _view(tee: Subscription, now: float) -> dict[str, Any]:
    """Zaqar's subscription (python-zaqarclient pops these keys and keeps the rest), plus the
    ``secret`` that signs its deliveries."""
    assert tee.webhook is not None
    return {
        "id": _zid(tee),
        "source": tee.meta["queue"],
        "subscriber": tee.meta["subscriber"],
        "ttl": tee.meta["ttl"],
        "age": int(now - tee.created_at),
        "options": tee.meta.get("options") or {},
        "confirmed": bool(tee.meta.get("confirmed")),
        "secret": tee.webhook.secret,
    }


def render(tee: Subscription, message: Message) -> tuple[bytes, dict[str, str]]:
    """The request Zaqar's webhook task would send for ``message``."""
    data, _, kind = _model.unwrap(message)
    options = tee.meta.get("options") or {}
    if kind == _model.NOTICE:
        payload: dict[str, Any] = msgspec.json.decode(bytes(data))
    else:
        payload = {"body": data}
        if kind == _model.POSTED and message.expires_at is not None:
            payload["ttl"] = round(message.expires_at - message.enqueued_at)
        payload["Message_Type"] = "Notification"
    payload["queue_name"] = tee.meta.get("queue", "")
    text = _encode(payload)
    template = options.get("post_data")
    if isinstance(template, str):
        text = template.replace('"$zaqar_message$"', text.decode()).encode()
    extra = options.get("post_headers")
    headers = (
        {k: v for k, v in extra.items() if _safe_header(k, v)} if isinstance(extra, dict) else {}
    )
    return text, headers


def _safe_header(key: object, value: object) -> bool:
    return (
        isinstance(key, str)
        and isinstance(value, str)
        and _HEADER.fullmatch(key) is not None
        and key.lower() not in _FORBIDDEN_HEADERS
        # The signature's own headers, and CloudEvents' (the body is Zaqar's, not an event).
        and not key.lower().startswith(("webhook-", "ce-"))
        and "\r" not in value
        and "\n" not in value
    )
