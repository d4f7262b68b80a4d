"""The hub's HTTP API (Starlette): /v1 paths, JSON errors, tokens, the SSE stream, the page.

Every failure a client can cause is a JSON error body with a 4xx status (see
docs/hub-api.md); an unexpected fault is a JSON 500 with no traceback (logged here). Bodies are
read up to ``max_body`` bytes and refused past it before they are parsed. No request changes
state before it is authenticated and its tenant checked (in `Hub`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from keel import errors
from keel._log import event as log_event
from keel.hub._auth import Principal
from keel.hub._core import Hub
from keel.hub._events import event_from_json
from keel.hub._input import MAX_SEQ, decode_json, integer, no_repeats, parse_uint
from keel.hub._map_feed import MapFeed
from keel.hub._openapi import openapi_document, refuse_undeclared
from keel.hub._sse import RAW_SEND, EventStreamResponse, StreamCursor
from keel.hub._status import error_fields, keel_error
from keel.hub._ws import websocket_stream
from keel.hub.stores.base import Claim, Gap, Message, Subscription
from keel.hub.zaqar import ZaqarConfig, zaqar_routes

log = logging.getLogger("keel.hub.http")

MAX_BODY = 64 * 1024

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, **fields: Any) -> Response:
    body = {"error": {"code": code, "message": message, "status": status, **fields}}
    return Response(msgspec.json.encode(body), status, media_type="application/json")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(data), status, media_type="application/json")


Handler = Callable[[Request], Awaitable[Response]]


def _guard(func: Handler) -> Handler:
    @functools.wraps(func)
    async def run(request: Request) -> Response:
        try:
            return await func(request)
        except ClientDisconnect:
            # The client went away mid-body: nobody reads an answer, and it is no error.
            return Response(status_code=400)
        except errors.KeelError as exc:
            status, code = keel_error(exc)
            if code == "internal":
                log_event(log, logging.ERROR, "hub.http_error", error=repr(exc))
            response = error_response(status, code, exc.message, **error_fields(exc))
            retry_after = getattr(exc, "retry_after", None)
            if isinstance(retry_after, int):  # 429 (and any error that says when to retry)
                response.headers["Retry-After"] = str(retry_after)
            return response

    return run


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "bad_request")
    response = error_response(exc.status_code, code, str(exc.detail))
    response.headers.update(exc.headers or {})  # 405's Allow
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    log_event(log, logging.ERROR, "hub.http_unhandled", path=request.url.path, error=repr(exc))
    return error_response(500, "internal", "internal error; the hub logged it")


async def read_json(request: Request, max_body: int = MAX_BODY, *, required: bool = False) -> Any:
    """The body as JSON (``{}`` when empty, unless ``required``), refused past ``max_body``
    bytes before it is parsed and past `MAX_DEPTH` levels before it is decoded."""
    declared = request.headers.get("content-length")
    if declared is not None:
        size = parse_uint(declared, "Content-Length")
        if size > max_body:
            raise errors.PayloadTooLarge(
                f"body of {size} bytes exceeds {max_body}", size=size, limit=max_body
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise errors.PayloadTooLarge(f"body exceeds {max_body} bytes", limit=max_body)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        if required:
            raise errors.BadRequest("this request needs a JSON body", field="body")
        return {}
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if ctype.lower() not in ("application/json", "application/cloudevents+json"):
        raise HTTPException(415, f"send application/json, not {ctype[:60]}")
    return decode_json(body)


def _query_int(
    request: Request, name: str, default: int | None, maximum: int = MAX_SEQ
) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    return parse_uint(raw, name, maximum=maximum)


def _seqs(body: Any) -> list[int] | None:
    if not isinstance(body, dict):
        raise errors.BadRequest("body must be a JSON object")
    unknown = set(body) - {"seqs"}
    if unknown:
        raise errors.BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    if "seqs" not in body:
        return None
    seqs = body["seqs"]
    if not isinstance(seqs, list) or len(seqs) > 1000:
        raise errors.BadRequest("seqs must be a list of up to 1000 positive integers", field="seqs")
    return [integer(s, "seqs", minimum=1, maximum=MAX_SEQ) for s in seqs]


def _number(body: Any, name: str, default: float, allowed: set[str]) -> float:
    if not isinstance(body, dict):
        raise errors.BadRequest("body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise errors.BadRequest(f"unknown field {sorted(unknown)[0]!r}")
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.BadRequest(f"{name} must be a number", field=name)
    return float(value)


def subscription_view(sub: Subscription) -> dict[str, Any]:
    return {
        "id": sub.id,
        "project": sub.project,
        "user": sub.user,
        "filter": sub.spec,
        "all_projects": sub.all_projects,
        "retention": msgspec.to_builtins(sub.retention),
        "max_deliveries": sub.max_deliveries,
        "created_at": sub.created_at,
        "last_seq": sub.last_seq,
        "first_seq": sub.first_seq,
        "dropped": sub.dropped,
        "webhook": msgspec.to_builtins(sub.webhook) if sub.webhook else None,
    }


def message_view(m: Message) -> dict[str, Any]:
    return {
        "seq": m.seq,
        "state": m.state,
        "deliveries": m.deliveries,
        "enqueued_at": m.enqueued_at,
        "event": m.event,
    }


def gap_view(gap: Gap | None) -> dict[str, int] | None:
    if gap is None:
        return None
    return {"from": gap.first, "to": gap.last, "count": gap.count}


def claim_view(c: Claim) -> dict[str, Any]:
    return {
        "claim_id": c.id,
        "expires_at": c.expires_at,
        "messages": [message_view(m) for m in c.messages],
    }


class Api:
    def __init__(
        self, hub: Hub, *, heartbeat: float = 15.0, map_feed: MapFeed | None = None
    ) -> None:
        self.hub = hub
        self.heartbeat = heartbeat
        self.map_feed = map_feed

    async def who(self, request: Request, *, query_token: bool = False) -> Principal:
        no_repeats(request.query_params.multi_items())
        route = request.scope.get("route")
        refuse_undeclared(request.query_params, getattr(route, "path", ""), request.method)
        token = request.headers.get("x-auth-token")
        if not token and query_token:
            token = request.query_params.get("access_token")
        return await self.hub.authenticate(token)

    async def subscriptions(self, request: Request) -> Response:
        who = await self.who(request)
        if request.method == "POST":
            sub = await self.hub.create_subscription(who, await read_json(request, required=True))
            return json_response(subscription_view(sub), 201)
        page, nxt = await self.hub.list_subscriptions(
            who,
            limit=_query_int(request, "limit", None),
            marker=request.query_params.get("marker"),
        )
        return json_response({"subscriptions": [subscription_view(s) for s in page], "next": nxt})

    async def subscription(self, request: Request) -> Response:
        who = await self.who(request)
        sub_id = request.path_params["sub_id"]
        if request.method == "DELETE":
            await self.hub.delete_subscription(who, sub_id)
            return Response(status_code=204)
        return json_response(subscription_view(await self.hub.subscription(who, sub_id)))

    async def events(self, request: Request) -> Response:
        who = await self.who(request)
        after = _query_int(request, "after", 0) or 0
        gap, messages = await self.hub.read(
            who,
            request.path_params["sub_id"],
            after=after,
            limit=_query_int(request, "limit", None),
        )
        nxt = messages[-1].seq if messages else None
        return json_response(
            {"gap": gap_view(gap), "messages": [message_view(m) for m in messages], "next": nxt}
        )

    async def claims(self, request: Request) -> Response:
        who = await self.who(request)
        body = await read_json(request)
        ttl = _number(body, "ttl", 30, {"ttl", "limit"})
        limit = integer(body.get("limit", 10), "limit", minimum=1, maximum=100)
        claim = await self.hub.claim(who, request.path_params["sub_id"], limit=limit, ttl=ttl)
        if claim is None:
            return Response(status_code=204)
        return json_response(claim_view(claim), 201)

    async def claim(self, request: Request) -> Response:
        who = await self.who(request)
        ttl = _number(await read_json(request), "ttl", 30, {"ttl"})
        p = request.path_params
        expires = await self.hub.extend(who, p["sub_id"], p["claim_id"], ttl)
        return json_response({"claim_id": p["claim_id"], "expires_at": expires})

    async def ack(self, request: Request) -> Response:
        who = await self.who(request)
        seqs = _seqs(await read_json(request))
        p = request.path_params
        return json_response({"acked": await self.hub.ack(who, p["sub_id"], p["claim_id"], seqs)})

    async def release(self, request: Request) -> Response:
        who = await self.who(request)
        await read_json(request)
        p = request.path_params
        return json_response({"released": await self.hub.release(who, p["sub_id"], p["claim_id"])})

    async def dead_letters(self, request: Request) -> Response:
        who = await self.who(request)
        messages = await self.hub.dead_letters(
            who,
            request.path_params["sub_id"],
            after=_query_int(request, "marker", 0) or 0,
            limit=_query_int(request, "limit", None),
        )
        limit = _query_int(request, "limit", 100)
        nxt = messages[-1].seq if messages and len(messages) == limit else None
        return json_response({"messages": [message_view(m) for m in messages], "next": nxt})

    async def redrive(self, request: Request) -> Response:
        who = await self.who(request)
        seqs = _seqs(await read_json(request))
        n = await self.hub.redrive(who, request.path_params["sub_id"], seqs)
        return json_response({"redriven": n})

    async def post_event(self, request: Request) -> Response:
        who = await self.who(request)
        if not who.is_admin:
            raise errors.Forbidden("only admins may post events")
        event = event_from_json(await read_json(request, required=True))
        await self.hub.ingest_as(who, event)
        return json_response({"id": event.id}, 202)

    async def stream(self, request: Request) -> Response:
        who = await self.who(request, query_token=True)
        sub_id = request.path_params["sub_id"]
        resume = request.headers.get("last-event-id")
        after: int | None
        if resume:
            after = parse_uint(resume, "Last-Event-ID")
        else:
            after = _query_int(request, "after", None)
        # Join the fan-out before reading the position: nothing committed in between is lost.
        client = self.hub.fanout.join(sub_id)
        try:
            sub = await self.hub.subscription(who, sub_id)
        except BaseException:
            self.hub.fanout.leave(client)
            raise
        stream = StreamCursor(self.hub, sub_id, client, sub.last_seq if after is None else after)
        return EventStreamResponse(
            stream,
            catch_up=after is not None,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document())

    async def healthz(self, request: Request) -> Response:
        return json_response({"ok": True})

    async def page(self, request: Request) -> Response:
        return _static_page("index.html")

    async def map_page(self, request: Request) -> Response:
        return _static_page("map.html")

    def _feed(self) -> MapFeed:
        if self.map_feed is None:
            raise errors.NotFound(
                "this hub records no service map; run it with a map database "
                "(`keel up` does, or set KEEL_MAP_DB for the services and the hub)"
            )
        return self.map_feed

    async def service_map(self, request: Request) -> Response:
        # The map names services, methods and rates, never a tenant's events, so any valid
        # token may read it.
        await self.who(request)
        return Response(self._feed().current(), media_type="application/json")

    async def map_stream(self, request: Request) -> Response:
        await self.who(request, query_token=True)
        return StreamingResponse(
            self._feed().frames(heartbeat=self.heartbeat),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )


def _static_page(name: str) -> Response:
    html = resources.files("keel.hub").joinpath("static", name).read_bytes()
    return Response(html, media_type="text/html; charset=utf-8")


class _App(Starlette):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


def create_app(
    hub: Hub,
    *,
    heartbeat: float = 15.0,
    map_feed: MapFeed | None = None,
    zaqar: ZaqarConfig | None = None,
) -> Starlette:
    hub.fanout.heartbeat = heartbeat
    api = Api(hub, heartbeat=heartbeat, map_feed=map_feed)
    s = "/v1/subscriptions/{sub_id}"
    c = s + "/claims/{claim_id}"
    table: list[tuple[str, Handler, list[str]]] = [
        ("/", api.page, ["GET"]),
        ("/map", api.map_page, ["GET"]),
        ("/v1/map", api.service_map, ["GET"]),
        ("/v1/map/stream", api.map_stream, ["GET"]),
        ("/healthz", api.healthz, ["GET"]),
        ("/v1/openapi.json", api.openapi, ["GET"]),
        ("/v1/events", api.post_event, ["POST"]),
        ("/v1/subscriptions", api.subscriptions, ["GET", "POST"]),
        (s, api.subscription, ["GET", "DELETE"]),
        (s + "/events", api.events, ["GET"]),
        (s + "/stream", api.stream, ["GET"]),
        (s + "/claims", api.claims, ["POST"]),
        (c, api.claim, ["PATCH"]),
        (c + "/ack", api.ack, ["POST"]),
        (c + "/release", api.release, ["POST"]),
        (s + "/dead-letters", api.dead_letters, ["GET"]),
        (s + "/dead-letters/redrive", api.redrive, ["POST"]),
    ]
    routes: list[BaseRoute] = [Route(path, _guard(h), methods=m) for path, h, m in table]

    async def ws(websocket: WebSocket) -> None:
        await websocket_stream(websocket, hub)

    routes.append(WebSocketRoute(s + "/ws", ws))
    routes += zaqar_routes(hub, zaqar)  # the Zaqar v2 face, over the same hub
    return _App(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
