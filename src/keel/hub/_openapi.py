"""The OpenAPI 3.1 document of the hub's /v1 API, written by hand beside the routes in _app.

Pure data. A test checks every route of the app appears here and the other way round, so the
two cannot drift silently.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from keel.errors import BadRequest
from keel.hub._events import (
    ATTRIBUTE_TEXT,
    BASE64,
    EXTENSION_NAME,
    KNOWN_ATTRIBUTES,
    MAX_ATTRIBUTE,
    MAX_ATTRIBUTES,
    MEDIA_TYPE,
    SEQ_ATTRIBUTE,
    SPECVERSION,
    TIME_PATTERN,
)
from keel.hub._filters import MAX_DEPTH, MAX_NODES, MAX_PATTERN, MAX_PATTERNS, MAX_SPEC_CHARS
from keel.hub._input import MAX_DEPTH as MAX_JSON_DEPTH
from keel.hub._webhooks import MAX_URL, WEBHOOK_URL

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "status"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
                "retry_after": {"type": "integer", "minimum": 0},
            },
        }
    },
}

_MAX_SEQ = 2**62
_STRING = {"type": "string", "maxLength": 1024}
_NULLABLE_STRING = {"type": ["string", "null"], "maxLength": 1024}
_PAIRS = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"pattern": "^[a-z0-9]{1,20}$"},
    "additionalProperties": _STRING,
}


def _filter_levels() -> dict[str, Any]:
    """``Filter1`` .. ``Filter<MAX_DEPTH>``: a filter at level n holds filters of level n+1,
    and the last level holds none, which is how the hub's depth limit reads in JSON Schema."""
    levels: dict[str, Any] = {}
    for level in range(1, MAX_DEPTH + 1):
        last = level == MAX_DEPTH
        inner = {"$ref": f"#/components/schemas/Filter{level + 1}"}
        many = {"type": "array", "maxItems": 0} if last else {"type": "array", "items": inner}
        properties: dict[str, Any] = {"exact": _PAIRS, "prefix": _PAIRS, "suffix": _PAIRS}
        properties |= {"all": many, "any": many}
        if not last:
            properties["not"] = inner
        levels[f"Filter{level}"] = {
            "type": "object",
            "description": "A CloudEvents Subscriptions API filter: exactly one dialect key.",
            "minProperties": 1,
            "maxProperties": 1,
            "properties": properties,
            "additionalProperties": False,
        }
    return levels


_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "description": (
        "Also bounded in all, which JSON Schema cannot say: at most "
        f"{MAX_NODES} filter nodes and {MAX_SPEC_CHARS} characters of strings (names "
        "included) in the whole spec; past either the hub answers 400 naming the limit."
    ),
    # The same bounds for machines: a 400 past one carries `field: filters` and `limit`.
    "x-keel-aggregate-limits": {"nodes": MAX_NODES, "characters": MAX_SPEC_CHARS},
    "properties": {
        "types": {
            "type": ["array", "null"],
            "items": {"type": "string", "maxLength": MAX_PATTERN},
            "minItems": 1,
            "maxItems": MAX_PATTERNS,
        },
        "source": _NULLABLE_STRING,
        "subject": _NULLABLE_STRING,
        "priority": {
            "oneOf": [
                _NULLABLE_STRING,
                {"type": "array", "items": _STRING, "minItems": 1, "maxItems": MAX_PATTERNS},
            ]
        },
        "filters": {
            "type": ["array", "null"],
            "items": {"$ref": "#/components/schemas/Filter1"},
            "maxItems": MAX_NODES,
        },
        "all_projects": {"type": "boolean"},
        "retention": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "max_age_s": {"type": ["number", "null"], "minimum": 1, "maximum": 2592000},
                "max_messages": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000},
            },
        },
        "max_deliveries": {"type": "integer", "minimum": 1, "maximum": 100},
        "webhook": {
            "type": ["object", "null"],
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": {"type": "string", "maxLength": MAX_URL, "pattern": WEBHOOK_URL},
                "mode": {"type": "string", "enum": ["structured", "binary"]},
            },
        },
    },
}

_ATTRIBUTE = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_ATTRIBUTE,
    "pattern": ATTRIBUTE_TEXT,
}
_OPTIONAL_ATTRIBUTE = {**_ATTRIBUTE, "type": ["string", "null"]}
# CloudEvents 1.0 in the JSON format, as the hub checks it (a null attribute is absent).
_CLOUDEVENT = {
    "type": "object",
    "description": (
        f"Also: the whole body at most 64 KiB and {MAX_JSON_DEPTH} levels of arrays and "
        "objects deep, which JSON Schema cannot say (the hub answers 413 or 400)."
    ),
    "required": ["specversion", "id", "source", "type"],
    "maxProperties": MAX_ATTRIBUTES,
    "propertyNames": {"anyOf": [{"enum": list(KNOWN_ATTRIBUTES)}, {"pattern": EXTENSION_NAME}]},
    "properties": {
        "specversion": {"const": SPECVERSION},
        "id": _ATTRIBUTE,
        "source": _ATTRIBUTE,
        "type": _ATTRIBUTE,
        "subject": _OPTIONAL_ATTRIBUTE,
        "dataschema": _OPTIONAL_ATTRIBUTE,
        "priority": _OPTIONAL_ATTRIBUTE,
        "tenant": _OPTIONAL_ATTRIBUTE,
        "datacontenttype": {
            "type": ["string", "null"],
            "maxLength": MAX_ATTRIBUTE,
            "pattern": MEDIA_TYPE,
        },
        "time": {"type": ["string", "null"], "pattern": TIME_PATTERN},
        "data": {},
        "data_base64": {"type": ["string", "null"], "pattern": BASE64},
        "extensions": {"type": "null"},
        SEQ_ATTRIBUTE: False,
    },
    "additionalProperties": {
        "anyOf": [
            {"type": ["boolean", "null"]},
            {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
            {"type": "string", "maxLength": MAX_ATTRIBUTE, "pattern": ATTRIBUTE_TEXT},
        ]
    },
    "not": {
        "required": ["data", "data_base64"],
        "properties": {"data": {"not": {"type": "null"}}, "data_base64": {"type": "string"}},
    },
}

_SUBSCRIPTION = {
    "type": "object",
    "required": ["id", "project", "filter", "last_seq", "first_seq", "dropped"],
    "properties": {
        "id": {"type": "string"},
        "project": {"type": "string"},
        "user": {"type": "string"},
        "filter": {"type": "object"},
        "all_projects": {"type": "boolean"},
        "retention": {"type": "object"},
        "max_deliveries": {"type": "integer"},
        "created_at": {"type": "number"},
        "last_seq": {"type": "integer"},
        "first_seq": {"type": "integer"},
        "dropped": {"type": "integer"},
        "webhook": {"type": ["object", "null"]},
    },
}

_MESSAGE = {
    "type": "object",
    "required": ["seq", "state", "deliveries", "event"],
    "properties": {
        "seq": {"type": "integer"},
        "state": {"type": "string", "enum": ["ready", "acked", "dead"]},
        "deliveries": {"type": "integer"},
        "enqueued_at": {"type": "number"},
        "event": {"type": "object"},
    },
}

_GAP = {
    "type": ["object", "null"],
    "properties": {
        "from": {"type": "integer"},
        "to": {"type": "integer"},
        "count": {"type": "integer"},
    },
}

_SEQS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "seqs": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": _MAX_SEQ},
            "maxItems": 1000,
        }
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


_ERRORS = {
    str(code): _json(_ref("Error"), text)
    for code, text in [
        (400, "Bad input"),
        (401, "Missing or unknown token"),
        (404, "Unknown id, or another project's"),
        (413, "Body too large"),
        (503, "The store or Keystone cannot be reached now; retry later"),
    ]
}

_POSITION = {"type": "integer", "minimum": 0, "maximum": _MAX_SEQ}
_SUB_ID = {"name": "sub_id", "in": "path", "required": True, "schema": {"type": "string"}}
_CLAIM_ID = {"name": "claim_id", "in": "path", "required": True, "schema": {"type": "string"}}
_LIMIT = {
    "name": "limit",
    "in": "query",
    "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
}


def _too_many(why: str) -> dict[str, Any]:
    return {
        **_json(
            _ref("Error"),
            f"{why}; send it again after `Retry-After` seconds (also `error.retry_after`)",
        ),
        "headers": {
            "Retry-After": {
                "description": "Whole seconds to wait before sending it again",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    }


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {**responses, **_ERRORS}, **extra}


@functools.cache
def openapi_document() -> dict[str, Any]:
    claim = {
        "type": "object",
        "properties": {
            "claim_id": {"type": "string"},
            "expires_at": {"type": "number"},
            "messages": {"type": "array", "items": _ref("Message")},
        },
    }
    conflict = {"409": _json(_ref("Error"), "Claim expired")}
    service_map = {
        "type": "object",
        "required": ["version", "at", "map"],
        "properties": {
            "version": {"type": "integer"},
            "at": {"type": "number"},
            "map": {
                "type": "object",
                "required": ["services", "edges", "smells"],
                "properties": {
                    "services": {"type": "object"},
                    "edges": {"type": "array", "items": {"type": "object"}},
                    "smells": {"type": "array", "items": {"type": "object"}},
                },
            },
        },
    }
    paths: dict[str, Any] = {
        "/v1/subscriptions": {
            "get": _op(
                "List your project's subscriptions",
                {"200": _json({"type": "object"})},
                parameters=[
                    _LIMIT,
                    {"name": "marker", "in": "query", "schema": {"type": "string"}},
                ],
            ),
            "post": _op(
                "Create a subscription",
                {
                    "201": _json(_ref("Subscription"), "Created"),
                    "403": _json(_ref("Error")),
                    "409": _json(_ref("Error"), "The project's subscription quota is used up"),
                    "429": _too_many(
                        "The project creates subscriptions faster than the hub's rate while "
                        "other projects are active: nothing was created"
                    ),
                },
                requestBody=_body(_ref("SubscriptionSpec")),
            ),
        },
        "/v1/subscriptions/{sub_id}": {
            "parameters": [_SUB_ID],
            "get": _op("Show a subscription", {"200": _json(_ref("Subscription"))}),
            "delete": _op("Delete a subscription", {"204": {"description": "Deleted"}}),
        },
        "/v1/subscriptions/{sub_id}/events": {
            "parameters": [_SUB_ID],
            "get": _op(
                "Replay the queue after a sequence number",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "gap": _GAP,
                                "messages": {"type": "array", "items": _ref("Message")},
                                "next": {"type": ["integer", "null"]},
                            },
                        }
                    )
                },
                parameters=[
                    {"name": "after", "in": "query", "schema": _POSITION},
                    _LIMIT,
                ],
            ),
        },
        "/v1/subscriptions/{sub_id}/stream": {
            "parameters": [_SUB_ID],
            "get": _op(
                "Server-Sent Events from the queue (Last-Event-ID resumes)",
                {"200": {"description": "text/event-stream"}},
                parameters=[
                    {"name": "after", "in": "query", "schema": _POSITION},
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    },
                    {"name": "access_token", "in": "query", "schema": {"type": "string"}},
                ],
            ),
        },
        "/v1/subscriptions/{sub_id}/ws": {
            "parameters": [_SUB_ID],
            "get": _op(
                "WebSocket stream with acks over the socket (upgrade)",
                {"101": {"description": "Switching protocols"}},
                parameters=[
                    {"name": "after", "in": "query", "schema": _POSITION},
                    {"name": "access_token", "in": "query", "schema": {"type": "string"}},
                ],
            ),
        },
        "/v1/subscriptions/{sub_id}/claims": {
            "parameters": [_SUB_ID],
            "post": _op(
                "Claim up to limit ready messages for ttl seconds",
                {
                    "201": _json(claim, "Claimed"),
                    "204": {"description": "Nothing to claim"},
                    "409": _json(_ref("Error"), "A webhook delivers this subscription"),
                },
                requestBody=_body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                            "ttl": {"type": "number", "minimum": 1, "maximum": 43200},
                        },
                    },
                    required=False,
                ),
            ),
        },
        "/v1/subscriptions/{sub_id}/claims/{claim_id}": {
            "parameters": [_SUB_ID, _CLAIM_ID],
            "patch": _op(
                "Extend a claim",
                {"200": _json({"type": "object"}), **conflict},
                requestBody=_body(
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"ttl": {"type": "number", "minimum": 1, "maximum": 43200}},
                    },
                    required=False,
                ),
            ),
        },
        "/v1/subscriptions/{sub_id}/claims/{claim_id}/ack": {
            "parameters": [_SUB_ID, _CLAIM_ID],
            "post": _op(
                "Ack a claim's messages",
                {"200": _json({"type": "object"}), **conflict},
                requestBody=_body(_SEQS, required=False),
            ),
        },
        "/v1/subscriptions/{sub_id}/claims/{claim_id}/release": {
            "parameters": [_SUB_ID, _CLAIM_ID],
            "post": _op("Release a claim", {"200": _json({"type": "object"}), **conflict}),
        },
        "/v1/subscriptions/{sub_id}/dead-letters": {
            "parameters": [_SUB_ID],
            "get": _op(
                "List dead letters",
                {"200": _json({"type": "object"})},
                parameters=[
                    _LIMIT,
                    {"name": "marker", "in": "query", "schema": _POSITION},
                ],
            ),
        },
        "/v1/subscriptions/{sub_id}/dead-letters/redrive": {
            "parameters": [_SUB_ID],
            "post": _op(
                "Make dead letters ready again",
                {"200": _json({"type": "object"})},
                requestBody=_body(_SEQS, required=False),
            ),
        },
        "/v1/map": {
            "get": _op(
                "The live service map (services, edges, smells) recorded by the traffic tap",
                {"200": _json(service_map, "The map; 404 when the hub records none")},
            ),
        },
        "/v1/map/stream": {
            "get": _op(
                "Server-Sent Events: the service map now and after every change",
                {"200": {"description": "text/event-stream of `map` events"}},
                parameters=[{"name": "access_token", "in": "query", "schema": {"type": "string"}}],
            ),
        },
        "/v1/events": {
            "post": _op(
                "Ingest one CloudEvent (admins)",
                {
                    "202": _json({"type": "object"}, "Committed"),
                    "403": _json(_ref("Error")),
                    "429": _too_many(
                        "The event's project holds its fair share of the hub's work while "
                        "other projects wait: nothing was accepted"
                    ),
                },
                requestBody=_body(_ref("CloudEvent")),
            ),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Keel hub", "version": "1"},
        "servers": [{"url": "/"}],
        "security": [{"token": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "token": {"type": "apiKey", "in": "header", "name": "X-Auth-Token"}
            },
            "schemas": {
                "Error": _ERROR,
                "CloudEvent": _CLOUDEVENT,
                **_filter_levels(),
                "SubscriptionSpec": _SPEC,
                "Subscription": _SUBSCRIPTION,
                "Message": _MESSAGE,
            },
        },
    }


@functools.cache
def query_parameters() -> dict[tuple[str, str], frozenset[str]]:
    """The query parameters the document declares, by (path template, HTTP method).

    The hub refuses any other name on a documented operation: a misspelt ``limt=5`` would
    otherwise be ignored in silence, and the document would not say exactly what is accepted.
    """
    declared: dict[tuple[str, str], frozenset[str]] = {}
    for path, item in openapi_document()["paths"].items():
        shared = item.get("parameters", [])  # a path item's parameters apply to each method
        for method, operation in item.items():
            if method == "parameters":
                continue
            params = shared + operation.get("parameters", [])
            declared[(path, method.upper())] = frozenset(
                p["name"] for p in params if p["in"] == "query"
            )
    return declared


def refuse_undeclared(names: Iterable[str], path: str, method: str) -> None:
    """A 400 for the first query parameter the document does not declare for the operation
    (HTTP routes and the WebSocket handshake alike); nothing for a path it does not list."""
    allowed = query_parameters().get((path, "GET" if method == "HEAD" else method))
    if allowed is None:  # not an operation of the document (the pages)
        return
    for name in names:
        if name not in allowed:
            raise BadRequest(
                f"unknown query parameter {name[:60]!r}"
                + (f"; this operation takes {', '.join(sorted(allowed))}" if allowed else ""),
                field=name[:60],
            )
