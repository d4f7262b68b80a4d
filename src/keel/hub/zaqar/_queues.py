"""Zaqar v2 queues: create, get (and HEAD), metadata PATCH (JSON-patch), delete, list,
stats, purge, share (signed URLs), plus the home document, ping and health."""

from __future__ import annotations

import contextlib
import copy
from typing import Any
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from keel.errors import Conflict, NotFound
from keel.hub.stores.base import Subscription
from keel.hub.zaqar import _model, _signed
from keel.hub.zaqar._errors import BAD_BODY, CONFLICT, ZaqarError, bad_request, not_found
from keel.hub.zaqar._face import Resource, check_metadata, spec_for
from keel.hub.zaqar._request import (
    Caller,
    body,
    bool_param,
    decode,
    json_object,
    limit_param,
    queue_name,
    single,
    strings,
)

PATCH_TYPE = "application/openstack-messaging-v2.0-json-patch"
_LIST_PARAMS = {"marker", "limit", "detailed", "name", "with_count"}
_PURGEABLE = {"messages", "subscriptions"}
_SHARE_KEYS = {"methods", "expires", "paths"}
_SHARE_PATHS = {"messages", "subscriptions", "claims"}


def json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(data), status, headers, media_type="application/json")


def no_content(headers: dict[str, str] | None = None) -> Response:
    return Response(status_code=204, headers=headers)


class Queues(Resource):
    async def item(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        if request.method == "PUT":
            return await self._create(request, who, name)
        if request.method == "DELETE":
            await self._delete(who, name)
            return no_content()
        if request.method == "PATCH":
            return await self._patch(request, who, name)
        sub = await self.face.queue(who, name)
        if sub is None:
            raise not_found(f"Queue {name} does not exist for project {who.project}")
        if request.method == "HEAD":
            return Response(status_code=200)
        return json(_model.with_reserved(_model.metadata_of(sub), self.face.config))

    async def _create(self, request: Request, who: Caller, name: str) -> Response:
        raw = await body(request, self.face.config.max_queue_metadata)
        metadata = json_object(raw)
        check_metadata(metadata, self.face.config)
        if await self.face.queue(who, name) is not None:
            return no_content({"location": request.url.path})
        if name.startswith("sub-"):
            raise bad_request("queue names starting with 'sub-' belong to Keel subscriptions")
        sub = _model.new_queue(
            self.face.config,
            project=who.project,
            user=who.principal.user,
            name=name,
            metadata=metadata,
            spec=spec_for(metadata),
            now=self.face.now(),
        )
        try:
            await self.face.hub.add_subscription(sub)
        except Conflict:  # created meanwhile (a quota refusal is not a Conflict)
            return no_content({"location": request.url.path})
        return Response(status_code=201, headers={"location": request.url.path})

    async def _delete(self, who: Caller, name: str) -> None:
        sub = await self.face.queue(who, name)
        if sub is None:
            return
        for tee in await self.face.tees(who.project, name):
            with contextlib.suppress(NotFound):
                await self.face.hub.delete_subscription(who.principal, tee.id)
        with contextlib.suppress(NotFound):
            await self.face.hub.delete_subscription(who.principal, sub.id)

    async def _patch(self, request: Request, who: Caller, name: str) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype != PATCH_TYPE:
            raise ZaqarError(
                415,
                "Unsupported media type",
                f"Accepted media type for PATCH: {PATCH_TYPE}.",
                headers={"accept-patch": PATCH_TYPE},
            )
        raw = await body(request, self.face.config.max_queue_metadata)
        if not raw.strip():
            raise bad_request("PATCH body could not be empty for update.", BAD_BODY)
        changes = decode(raw, object)
        if not isinstance(changes, list):
            raise bad_request("Request body must be a JSON array of operation objects.", BAD_BODY)
        sub = await self.face.queue(who, name)
        if sub is None:
            raise not_found(f"Queue {name} does not exist for project {who.project}")
        metadata = _model.metadata_of(sub)
        reserved = _model.with_reserved({}, self.face.config)
        for change in changes:
            _apply(metadata, reserved, change)
        check_metadata(metadata, self.face.config)
        sub = copy.copy(sub)
        sub.meta = {**sub.meta, "metadata": metadata}
        if _model.is_queue_made_here(sub):
            sub.spec = spec_for(metadata)
        await self.face.hub.update_subscription(sub)
        return json(_model.with_reserved(metadata, self.face.config))

    async def collection(self, request: Request) -> Response:
        who = await self.who(request)
        config = self.face.config
        limit = limit_param(request, config.max_queues_per_page)
        detailed = bool_param(request, "detailed")
        with_count = bool_param(request, "with_count")
        contains = single(request, "name")
        kfilter = {k: _typed(v) for k, v in request.query_params.items() if k not in _LIST_PARAMS}
        marker = single(request, "marker")
        page, count = await self._page(
            who,
            limit=limit,
            marker=marker,
            contains=contains,
            kfilter=kfilter,
            with_count=with_count,
        )
        path = request.url.path
        queues: list[dict[str, Any]] = []
        for sub in page:
            name = _model.name_of(sub)
            item: dict[str, Any] = {"name": name, "href": f"{path}/{name}"}
            if detailed:
                item["metadata"] = _model.with_reserved(_model.metadata_of(sub), config)
            queues.append(item)
        links = []
        if queues:
            params: dict[str, Any] = {"marker": queues[-1]["name"], "limit": limit}
            if detailed:
                params["detailed"] = "true"
            if contains:
                params["name"] = contains
            links = [{"rel": "next", "href": f"{path}?{urlencode(params)}"}]
        out: dict[str, Any] = {"queues": queues, "links": links}
        if with_count and count:
            out["count"] = count
        return json(out)

    async def _page(
        self,
        who: Caller,
        *,
        limit: int,
        marker: str | None,
        contains: str | None,
        kfilter: dict[str, Any],
        with_count: bool,
    ) -> tuple[list[Subscription], int]:
        """Queues in id order after ``marker`` (a queue name, as the next links carry it):
        Keel subscriptions, then queues made here; the Zaqar subscriptions' ids sort after
        both and end the walk."""
        store = self.face.hub.store
        after = _model.queue_id(who.project, marker) if marker else None
        out: list[Subscription] = []
        count = 0
        while True:
            batch = await store.list_subscriptions(who.project, limit=200, marker=after)
            for sub in batch:
                if sub.id.startswith("zs:"):
                    return out, count
                if not _matches(sub, contains, kfilter):
                    continue
                count += 1
                if len(out) < limit:
                    out.append(sub)
                elif not with_count:
                    return out, count
            if len(batch) < 200:
                return out, count
            after = batch[-1].id

    async def stats(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        sub = await self.face.queue(who, name)
        if sub is None:
            return json({"messages": {"claimed": 0, "free": 0, "total": 0}})
        now = self.face.now()
        st = await self.face.hub.store.stats(sub.id, now=now)
        messages: dict[str, Any] = {
            "claimed": st.claimed,
            "free": st.free + st.delayed,
            "total": st.total,
        }
        base = request.url.path.rsplit("/", 1)[0] + "/messages/"
        for key, m in (("oldest", st.oldest), ("newest", st.newest)):
            if m is not None:
                messages[key] = {
                    "age": int(now - m.enqueued_at),
                    "created": _model.iso(m.enqueued_at),
                    "href": base + _model.message_id(sub, m.seq),
                }
        return json({"messages": messages})

    async def purge(self, request: Request) -> Response:
        who = await self.who(request)
        name = queue_name(request)
        raw = await body(request, self.face.config.max_queue_metadata)
        doc = json_object(raw) if raw.strip() else {"resource_types": sorted(_PURGEABLE)}
        if "resource_types" not in doc:
            raise bad_request('Post body must contain key "resource_types".')
        kinds = strings(doc["resource_types"], "resource_types")
        if not set(kinds) <= _PURGEABLE:
            raise bad_request(f"Resource types must be a sub set of {sorted(_PURGEABLE)}.")
        sub = await self.face.queue(who, name)
        if sub is None:
            return no_content()
        if "messages" in kinds:
            await self.face.hub.store.delete_messages(
                sub.id, None, now=self.face.now(), unclaimed_only=False
            )
        if "subscriptions" in kinds:
            for tee in await self.face.tees(who.project, name):
                with contextlib.suppress(NotFound):
                    await self.face.hub.delete_subscription(who.principal, tee.id)
        return no_content()

    async def share(self, request: Request) -> Response:
        who = await self.who(request)
        queue_name(request)
        doc = json_object(await body(request, self.face.config.max_queue_metadata))
        unknown = set(doc) - _SHARE_KEYS
        if unknown:
            raise bad_request(f"Unknown keys: {sorted(unknown)}")
        base = request.url.path.rsplit("/", 1)[0]
        wanted = doc.get("paths") or ["messages"]
        paths = strings(wanted, "paths")
        if not set(paths) <= _SHARE_PATHS:
            raise bad_request(f"Invalid paths: {sorted(set(paths) - _SHARE_PATHS)}")
        methods = doc.get("methods")
        expires = doc.get("expires")
        if expires is not None and not isinstance(expires, str):
            raise bad_request("`expires` should be date format, for example 2016-01-01T00:00:00")
        try:
            signed = _signed.sign(
                self.face.config.secret_key,
                [f"{base}/{p}" for p in paths],
                project=who.project,
                methods=None if methods is None else strings(methods, "methods"),
                expires=expires,
            )
        except ValueError as exc:
            raise bad_request(str(exc)) from None
        return json(msgspec.to_builtins(signed))

    async def home(self, request: Request) -> Response:
        await self.who(request)
        return json(_HOME)

    async def ping(self, request: Request) -> Response:
        await self.who(request)
        return no_content()

    async def health(self, request: Request) -> Response:
        who = await self.who(request)
        if not who.principal.is_admin:
            raise ZaqarError(403, "Not authorized", "health is for admins")
        await self.face.hub.store.count_subscriptions(who.project)  # the store answers
        return json({"storage_reachable": True, "catalog_reachable": True})


def _apply(metadata: dict[str, Any], reserved: dict[str, Any], change: Any) -> None:
    """One JSON-patch operation on ``/metadata/<key>`` (Zaqar's draft-10 subset)."""
    if not isinstance(change, dict):
        raise bad_request("Operations must be JSON objects.", BAD_BODY)
    op, path = change.get("op"), change.get("path")
    if op not in ("add", "remove", "replace"):
        raise bad_request(
            f"Invalid operation: `{str(op)[:20]}`. It must be one of the following: "
            "add, remove, replace.",
            BAD_BODY,
        )
    if not isinstance(path, str) or not path.startswith("/"):
        raise bad_request("Pointer must be a string starting with '/'.", BAD_BODY)
    parts = [p.replace("~1", "/").replace("~0", "~").strip() for p in path[1:].split("/")]
    if len(parts) != 2 or parts[0].lower() != "metadata" or not parts[1]:
        raise bad_request(
            f"Invalid JSON pointer for this resource: '{path[:80]}', e.g /metadata/key", BAD_BODY
        )
    key = parts[1]
    if op == "remove":
        if key in metadata:
            del metadata[key]
        elif key not in reserved:
            raise ZaqarError(409, CONFLICT, f"Can't remove non-existent object {key}.")
        return
    if "value" not in change:
        raise bad_request(f'Operation "{op}" requires a member named "value".', BAD_BODY)
    if op == "replace" and key not in metadata and key not in reserved:
        raise ZaqarError(409, CONFLICT, f"Can't replace non-existent object {key}.")
    metadata[key] = change["value"]


def _typed(value: str) -> Any:
    try:
        return int(value) if value.isascii() else value
    except ValueError:
        return value


def _matches(sub: Subscription, contains: str | None, kfilter: dict[str, Any]) -> bool:
    if contains and contains not in _model.name_of(sub):
        return False
    metadata = _model.metadata_of(sub)
    return all(metadata.get(k) == v for k, v in kfilter.items())


_HOME = {
    "json-home": {
        "resources": {
            f"rel/{name}": {"href-template": template}
            for name, template in (
                ("queues", "/v2/queues{?marker,limit,detailed}"),
                ("queue", "/v2/queues/{queue_name}"),
                ("queue_stats", "/v2/queues/{queue_name}/stats"),
                ("messages", "/v2/queues/{queue_name}/messages{?marker,limit,echo}"),
                ("post_messages", "/v2/queues/{queue_name}/messages"),
                ("claim", "/v2/queues/{queue_name}/claims{?limit}"),
                ("subscriptions", "/v2/queues/{queue_name}/subscriptions"),
                ("share", "/v2/queues/{queue_name}/share"),
                ("ping", "/v2/ping"),
            )
        }
    }
}
