"""The hub's own API on every store: a subscription id holding NUL (``%00`` in the path)
names no subscription: a 404, never a 500 (PostgreSQL text cannot hold NUL, so the query
itself failed)."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/subscriptions/a%00b"),
        ("DELETE", "/v1/subscriptions/a%00b"),
        ("GET", "/v1/subscriptions/a%00b/events"),
        ("POST", "/v1/subscriptions/a%00b/claims"),
        ("POST", "/v1/subscriptions/a%00b/claims/c%00/ack"),
        ("GET", "/v1/subscriptions/a%00b/dead-letters"),
    ],
)
async def test_nul_in_a_subscription_id(alice: httpx.AsyncClient, method: str, path: str) -> None:
    r = await alice.request(method, path, json={})
    assert r.status_code == 404, (r.status_code, r.text[:200])
