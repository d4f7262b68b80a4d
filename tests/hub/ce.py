"""The official CloudEvents SDK (PyPI ``cloudevents``) as the judge of what the hub emits.

Each helper parses with both of the SDK's parsers: the HTTP ``from_http`` of its v1 API
(which refuses an event without ``specversion``) and the core API's JSON format and HTTP
binding with its strict v1 event (attribute types, names and values validated). On top, the
JSON format's own rules the parsers leave unchecked: ``specversion`` written out, and a
``datacontenttype`` whenever there is data.
"""

from __future__ import annotations

import json
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from cloudevents.v1.http import from_http as v1_from_http

STRUCTURED = "application/cloudevents+json"


def _format_rules(raw: Any) -> None:
    assert isinstance(raw, dict), raw
    assert raw.get("specversion") == "1.0", raw
    if "data" in raw or "data_base64" in raw:
        assert raw.get("datacontenttype"), raw


def structured(body: bytes | str) -> BaseCloudEvent:
    """One event in the JSON format (an SSE ``data``, a WebSocket message, a webhook body)."""
    data = body.encode() if isinstance(body, str) else body
    _format_rules(json.loads(data))
    v1_from_http({"content-type": STRUCTURED}, data)
    return from_structured(
        HTTPMessage({"content-type": STRUCTURED}, data), JSONFormat(), CloudEvent
    )


def http(headers: dict[str, str], body: bytes) -> BaseCloudEvent:
    """A webhook request, in whichever content mode it came."""
    v1_from_http(headers, body)
    message = HTTPMessage({k.lower(): v for k, v in headers.items()}, body)
    if any(k.lower().startswith("ce-") for k in headers):
        assert headers.get("ce-specversion") == "1.0", headers
        return from_binary(message, JSONFormat(), CloudEvent)
    assert headers["content-type"] == STRUCTURED, headers
    return structured(body)
