"""Text the hub takes from clients: CloudEvents string attributes hold no control character,
surrogate or noncharacter (the spec forbids them; a ``\\n`` in ``type`` would split an SSE
line, a NUL fails a PostgreSQL text column), and no JSON object names a member twice
(which one counts is each decoder's guess). Both are a JSON 400 on every store; an event
from the bus with such text is kept, the characters replaced."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from keel.errors import BadRequest
from keel.hub import from_notification
from keel.hub._events import ATTRIBUTE_TEXT, decode_event
from keel.hub._input import decode_json

pytestmark = pytest.mark.timeout(60)

BASE = {"specversion": "1.0", "id": "e-1", "source": "s", "type": "t"}
FORBIDDEN = ["\x00", "\n", "\r", "\x1f", "\x7f", "\x85", "\x9f", "\ufdd0", "\ufffe", "\uffff"]


@pytest.mark.parametrize("char", FORBIDDEN)
@pytest.mark.parametrize("name", ["id", "source", "type", "subject", "tenant", "myext"])
def test_a_forbidden_character_in_an_attribute_is_refused(name: str, char: str) -> None:
    body = json.dumps({**BASE, name: f"a{char}b"}).encode()
    with pytest.raises(BadRequest, match="forbids") as info:
        decode_event(body)
    assert info.value.field == name


def test_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(BadRequest):
        decode_event(json.dumps({**BASE, "type": "a\ud800"}).encode())


@pytest.mark.parametrize("text", ["plain", "üñí©ødé", "tab-free\u00a0nbsp", "\U0001f600"])
def test_printable_text_passes_and_matches_the_documented_pattern(text: str) -> None:
    assert decode_event(json.dumps({**BASE, "type": text}).encode()).type == text
    assert re.fullmatch(ATTRIBUTE_TEXT, text)


@pytest.mark.parametrize("char", FORBIDDEN)
def test_the_documented_pattern_refuses_what_the_hub_refuses(char: str) -> None:
    assert not re.fullmatch(ATTRIBUTE_TEXT, f"a{char}")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "a", "type": "b"}',
        b'{"a": {"b": 1, "b": 2}}',
        b'[{"x": 1}, {"y": {"z": 1, "z": 1}}]',
        b'{"a:b": 1, "c": "::", "c": 2}',
        b'{"\\u0061": 1, "a": 2}',  # the same name, escaped once
    ],
)
def test_a_repeated_member_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest, match="more than once"):
        decode_json(raw)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"a": "x:y", "b": {"c": "::"}}', {"a": "x:y", "b": {"c": "::"}}),
        (b'[{"a": 1}, {"a": 2}]', [{"a": 1}, {"a": 2}]),
        (b'{"a\\":b": 1, "c": "\\"::"}', {'a":b': 1, "c": '"::'}),
        (b'"a:b"', "a:b"),
        (b"{}", {}),
    ],
)
def test_colons_in_strings_are_not_members(raw: bytes, value: Any) -> None:
    assert decode_json(raw) == value


def test_a_notification_with_forbidden_text_is_kept_cleaned() -> None:
    event = from_notification(
        None,
        "compute.host\n1",
        "compute.instance\x00.create.end",
        {"instance_id": "i\r\n-1", "tenant_id": "p\x85"},
        {"message_id": "m\x1f1", "priority": "INFO\x7f"},
    )
    for value in (event.id, event.source, event.type, event.subject, event.priority):
        assert value is not None
        assert re.fullmatch(ATTRIBUTE_TEXT, value), value
    assert event.type == "compute.instance\ufffd.create.end"


async def test_over_http_both_are_a_json_400_and_nothing_is_stored(
    admin: httpx.AsyncClient, alice: httpx.AsyncClient
) -> None:
    sub = (await alice.post("/v1/subscriptions", json={})).json()["id"]
    headers = {"content-type": "application/json"}
    bodies = [
        json.dumps({**BASE, "type": "a\nb", "tenant": "p-one"}).encode(),
        b'{"specversion": "1.0", "id": "e-2", "source": "s", "type": "t", "type": "u"}',
        b'{"name": "x", "name": "y"}',
    ]
    for body in bodies[:2]:
        r = await admin.post("/v1/events", content=body, headers=headers)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["status"] == 400
    r = await alice.post("/v1/subscriptions", content=bodies[2], headers=headers)
    assert r.status_code == 400, r.text
    assert "more than once" in r.json()["error"]["message"]
    r = await alice.get(f"/v1/subscriptions/{sub}/events")
    assert r.status_code == 200
    assert r.json()["messages"] == []
