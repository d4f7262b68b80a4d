"""The store conformance suite: every store (see conftest.STORES) keeps the same promises."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from keel.errors import ClaimExpired, NotFound
from keel.hub.stores.base import Claim, Retention, Routed, Store, Subscription

NOW = 1_000_000.0


async def make_sub(store: Store, sub_id: str, **kw: object) -> Subscription:
    sub = Subscription(
        id=sub_id,
        project="p",
        user="u",
        spec={},
        created_at=NOW,
        **kw,  # type: ignore[arg-type]
    )
    await store.create_subscription(sub)
    return sub


def ev(n: int) -> bytes:
    return msgspec.json.encode({"id": f"e{n}", "source": "s", "type": "t", "n": n})


async def test_append_numbers_each_queue_from_one(store: Store) -> None:
    await make_sub(store, "a")
    await make_sub(store, "b")
    out = await store.append(
        [Routed("e1", ev(1), ("a", "b")), Routed("e2", ev(2), ("a",))], now=NOW
    )
    assert [(x.subscription, x.seq) for x in out] == [("a", 1), ("b", 1), ("a", 2)]
    _, msgs = await store.read("a", after=0, limit=10)
    assert [m.seq for m in msgs] == [1, 2]
    assert msgspec.json.decode(msgs[1].event)["n"] == 2


async def test_redelivered_event_is_not_enqueued_twice(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",))], now=NOW)
    again = await store.append([Routed("e1", ev(1), ("a",))], now=NOW + 1)
    assert again == []
    assert (await store.get_subscription("a")).last_seq == 1


async def test_length_retention_counts_drops_and_reports_a_gap(store: Store) -> None:
    await make_sub(store, "a", retention=Retention(max_age_s=None, max_messages=3))
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 8)], now=NOW)
    sub = await store.get_subscription("a")
    assert (sub.first_seq, sub.last_seq, sub.dropped) == (5, 7, 4)
    gap, msgs = await store.read("a", after=1, limit=10)
    assert gap is not None
    assert (gap.first, gap.last, gap.count) == (2, 4, 3)
    assert [m.seq for m in msgs] == [5, 6, 7]
    nogap, _ = await store.read("a", after=4, limit=10)
    assert nogap is None


async def test_age_retention_drops_from_the_head(store: Store) -> None:
    await make_sub(store, "a", retention=Retention(max_age_s=10, max_messages=None))
    await store.append([Routed("e1", ev(1), ("a",))], now=NOW)
    await store.append([Routed("e2", ev(2), ("a",))], now=NOW + 8)
    assert await store.enforce_retention(now=NOW + 12) == 1
    sub = await store.get_subscription("a")
    assert (sub.first_seq, sub.dropped) == (2, 1)


async def test_claim_ack_and_expiry(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 4)], now=NOW)
    c1 = await store.claim("a", limit=2, ttl=30, now=NOW, max_deliveries=5)
    assert c1 is not None
    assert [m.seq for m in c1.messages] == [1, 2]
    c2 = await store.claim("a", limit=5, ttl=30, now=NOW, max_deliveries=5)
    assert c2 is not None
    assert [m.seq for m in c2.messages] == [3]
    assert await store.claim("a", limit=5, ttl=30, now=NOW, max_deliveries=5) is None
    assert await store.ack("a", c1.id, [1], now=NOW + 1) == 1
    # c1 expires: seq 2 is visible again, seq 1 stays acked.
    c3 = await store.claim("a", limit=5, ttl=30, now=NOW + 31, max_deliveries=5)
    assert c3 is not None
    assert [(m.seq, m.deliveries) for m in c3.messages] == [(2, 2), (3, 2)]
    with pytest.raises(ClaimExpired):
        await store.ack("a", c1.id, None, now=NOW + 31)


async def test_release_and_extend(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",))], now=NOW)
    c = await store.claim("a", limit=1, ttl=10, now=NOW, max_deliveries=5)
    assert c is not None
    assert await store.extend("a", c.id, ttl=100, now=NOW + 5) == NOW + 105
    assert await store.claim("a", limit=1, ttl=10, now=NOW + 50, max_deliveries=5) is None
    assert await store.release("a", c.id, now=NOW + 50) == 1
    again = await store.claim("a", limit=1, ttl=10, now=NOW + 50, max_deliveries=5)
    assert again is not None
    with pytest.raises(NotFound):
        await store.ack("a", "clm-nope", None, now=NOW)


async def test_max_deliveries_dead_letters_and_redrive(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",))], now=NOW)
    t = NOW
    for _ in range(2):
        assert await store.claim("a", limit=1, ttl=1, now=t, max_deliveries=2) is not None
        t += 2
    assert await store.claim("a", limit=1, ttl=1, now=t, max_deliveries=2) is None
    dead = await store.dead_letters("a", after=0, limit=10)
    assert [(m.seq, m.state) for m in dead] == [(1, "dead")]
    assert await store.redrive("a", None) == 1
    assert await store.dead_letters("a", after=0, limit=10) == []
    c = await store.claim("a", limit=1, ttl=1, now=t, max_deliveries=2)
    assert c is not None
    assert c.messages[0].deliveries == 1


async def test_subscriptions_list_by_project_and_page(store: Store) -> None:
    for i in range(5):
        await make_sub(store, f"s{i}")
    other = Subscription(id="x", project="q", user="u", spec={}, created_at=NOW)
    await store.create_subscription(other)
    page = await store.list_subscriptions("p", limit=3, marker=None)
    assert [s.id for s in page] == ["s0", "s1", "s2"]
    page = await store.list_subscriptions("p", limit=3, marker="s2")
    assert [s.id for s in page] == ["s3", "s4"]
    assert await store.count_subscriptions("q") == 1


async def test_unknown_and_deleted_subscriptions_are_not_found(store: Store) -> None:
    await make_sub(store, "a")
    await store.delete_subscription("a")
    with pytest.raises(NotFound):
        await store.get_subscription("a")
    with pytest.raises(NotFound):
        await store.read("a", after=0, limit=1)
    with pytest.raises(NotFound):
        await store.claim("a", limit=1, ttl=1, now=NOW, max_deliveries=1)
    # Appending to a deleted subscription is a no-op, not an error (routing raced the delete).
    assert await store.append([Routed("e1", ev(1), ("a",))], now=NOW) == []


async def test_ack_upto_and_the_acked_prefix(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 5)], now=NOW)
    assert await store.acked_upto("a") == 0
    claim = await store.claim("a", limit=1, ttl=30, now=NOW, max_deliveries=5)
    assert claim is not None
    # Seq 1 is claimed by a pull consumer: a stream ack does not touch it.
    assert await store.ack_upto("a", 3) == 2
    assert await store.acked_upto("a") == 0
    await store.ack("a", claim.id, None, now=NOW)
    assert await store.acked_upto("a") == 3
    assert await store.ack_upto("a", 10) == 1
    assert await store.acked_upto("a") == 4


async def test_concurrent_writes_fail_and_succeed_independently(store: Store) -> None:
    # Writes that run at once (the SQLite store commits them together) keep their own
    # outcome: one that fails changes nothing and does not undo the others.
    await make_sub(store, "a")
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 5)], now=NOW)
    old = await store.claim("a", limit=1, ttl=10, now=NOW, max_deliveries=5)
    assert old is not None
    results = await asyncio.gather(
        store.ack("a", old.id, None, now=NOW + 20),  # expired by then
        store.claim("a", limit=2, ttl=30, now=NOW + 20, max_deliveries=5),
        store.append([Routed("e5", ev(5), ("a", "gone"))], now=NOW + 20),
        store.get_subscription("gone"),
        return_exceptions=True,
    )
    assert isinstance(results[0], ClaimExpired)
    claim = results[1]
    assert isinstance(claim, Claim)
    assert [m.seq for m in claim.messages] == [1, 2]
    appended = results[2]
    assert isinstance(appended, list)
    assert [(a.subscription, a.seq) for a in appended] == [("a", 5)]
    assert isinstance(results[3], NotFound)
    assert await store.ack("a", claim.id, None, now=NOW + 21) == 2
    _, msgs = await store.read("a", after=0, limit=10)
    assert [(m.seq, m.state) for m in msgs] == [
        (1, "acked"),
        (2, "acked"),
        (3, "ready"),
        (4, "ready"),
        (5, "ready"),
    ]


async def test_bodies_shared_by_queues_outlive_retention_and_deletes_of_others(
    store: Store,
) -> None:
    # One body per event however many queues it went to; cleaning up the bodies no queue
    # holds any more must never take one a queue still holds.
    await make_sub(store, "a", retention=Retention(max_age_s=10, max_messages=None))
    await make_sub(store, "b")
    await make_sub(store, "c", retention=Retention(max_age_s=None, max_messages=2))
    await store.append([Routed(f"e{n}", ev(n), ("a", "b", "c")) for n in range(1, 5)], now=NOW)
    await store.append([Routed("e5", ev(5), ("a", "c")), Routed("e6", ev(6), ("b",))], now=NOW + 20)
    await store.delete_subscription("b")
    assert await store.enforce_retention(now=NOW + 25) == 4  # a's first four
    for sub_id, want in (("a", [5]), ("c", [4, 5])):
        _, messages = await store.read(sub_id, after=0, limit=10)
        assert [msgspec.json.decode(bytes(m.event))["n"] for m in messages] == want
    await store.append([Routed("e7", ev(7), ("a",))], now=NOW + 26)
    _, messages = await store.read("a", after=0, limit=10)
    assert [msgspec.json.decode(bytes(m.event))["n"] for m in messages] == [5, 7]


# --- per-message life, claims by id, stats, updates (the primitives the Zaqar API uses) ---


async def test_ttl_expires_a_message_for_claims_and_live_listings(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",), ttl=60), Routed("e2", ev(2), ("a",))], now=NOW)
    assert [m.seq for m in await store.live("a", after=0, limit=10, now=NOW + 59)] == [1, 2]
    assert [m.seq for m in await store.live("a", after=0, limit=10, now=NOW + 60)] == [2]
    assert await store.get_messages("a", [1, 2], now=NOW + 61) == [
        (await store.get_messages("a", [2], now=NOW + 61))[0]
    ]
    claim = await store.claim("a", limit=10, ttl=30, now=NOW + 61, max_deliveries=5)
    assert claim is not None
    assert [m.seq for m in claim.messages] == [2]
    # Replay still shows the expired message until retention drops it.
    _, msgs = await store.read("a", after=0, limit=10)
    assert [m.seq for m in msgs] == [1, 2]
    assert msgs[0].expires_at == NOW + 60
    assert msgs[1].expires_at is None


async def test_delay_hides_a_message_until_it_passes(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",), delay=30)], now=NOW)
    assert await store.live("a", after=0, limit=10, now=NOW + 29) == []
    delayed = await store.live("a", after=0, limit=10, now=NOW + 29, delayed=True)
    assert [m.seq for m in delayed] == [1]
    assert await store.claim("a", limit=1, ttl=30, now=NOW + 29, max_deliveries=5) is None
    stats = await store.stats("a", now=NOW + 29)
    assert (stats.free, stats.claimed, stats.delayed) == (0, 0, 1)
    assert await store.claim("a", limit=1, ttl=30, now=NOW + 30, max_deliveries=5) is not None


async def test_claim_grace_keeps_held_messages_alive(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",), ttl=60), Routed("e2", ev(2), ("a",))], now=NOW)
    claim = await store.claim("a", limit=10, ttl=100, grace=50, now=NOW, max_deliveries=5)
    assert claim is not None
    held = {m.seq: m.expires_at for m in claim.messages}
    assert held == {1: NOW + 150, 2: None}  # a message that never expires does not start to
    assert await store.extend("a", claim.id, ttl=200, grace=60, now=NOW + 10) == NOW + 210
    again = await store.get_claim("a", claim.id, now=NOW + 20)
    assert (again.ttl, again.created_at) == (200, NOW)
    assert {m.seq: m.expires_at for m in again.messages} == {1: NOW + 270, 2: None}


async def test_live_listing_with_and_without_claimed(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 5)], now=NOW)
    claim = await store.claim("a", limit=2, ttl=30, now=NOW, max_deliveries=5)
    assert claim is not None
    assert [m.seq for m in await store.live("a", after=0, limit=10, now=NOW)] == [3, 4]
    both = await store.live("a", after=0, limit=10, now=NOW, claimed=True)
    assert [(m.seq, m.claimed(NOW)) for m in both] == [(1, True), (2, True), (3, False), (4, False)]
    assert [m.seq for m in await store.live("a", after=1, limit=2, now=NOW, claimed=True)] == [2, 3]
    # Once the claim expires its messages are free again.
    assert [m.seq for m in await store.live("a", after=0, limit=10, now=NOW + 31)] == [1, 2, 3, 4]
    stats = await store.stats("a", now=NOW)
    assert (stats.free, stats.claimed, stats.total) == (2, 2, 4)
    assert stats.oldest is not None
    assert stats.oldest.seq == 1
    assert stats.newest is not None
    assert stats.newest.seq == 4


async def test_delete_messages_by_seq_and_all(store: Store) -> None:
    await make_sub(store, "a")
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in range(1, 6)], now=NOW)
    claim = await store.claim("a", limit=1, ttl=30, now=NOW, max_deliveries=5)
    assert claim is not None
    # Seq 1 is held: an unclaimed-only delete skips it, a plain one does not.
    assert await store.delete_messages("a", [1, 2], now=NOW, unclaimed_only=True) == 1
    assert await store.delete_messages("a", [1, 2], now=NOW, unclaimed_only=False) == 1
    assert [m.seq for m in await store.live("a", after=0, limit=10, now=NOW)] == [3, 4, 5]
    assert await store.delete_messages("a", None, now=NOW, unclaimed_only=False) == 3
    assert (await store.stats("a", now=NOW)).total == 0
    with pytest.raises(NotFound):
        await store.get_claim("a", "clm-nope", now=NOW)
    # The claim lives on, holding nothing.
    assert (await store.get_claim("a", claim.id, now=NOW)).messages == []
    with pytest.raises(ClaimExpired):
        await store.get_claim("a", claim.id, now=NOW + 30)


async def test_update_subscription_replaces_what_its_creator_set(store: Store) -> None:
    sub = await make_sub(store, "a")
    await store.append([Routed("e1", ev(1), ("a",))], now=NOW)
    sub.meta = {"name": "jobs", "metadata": {"k": 1}}
    sub.parent = "b"
    sub.expires_at = NOW + 60
    sub.retention = Retention(max_age_s=None, max_messages=1)
    await store.update_subscription(sub)
    got = await store.get_subscription("a")
    assert (got.meta, got.parent, got.expires_at) == (sub.meta, "b", NOW + 60)
    assert got.last_seq == 1  # the store's own fields are kept
    await store.append([Routed(f"e{n}", ev(n), ("a",)) for n in (2, 3)], now=NOW)
    assert (await store.get_subscription("a")).first_seq == 3  # the new retention applies
    gone = Subscription(id="nope", project="p", user="u", spec={}, created_at=NOW)
    with pytest.raises(NotFound):
        await store.update_subscription(gone)
