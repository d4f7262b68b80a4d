"""Webhooks: Standard Webhooks signatures, retries with backoff kept in the store, dead
letters after the last try, in-order delivery, and the SSRF guard."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trustme

from keel.errors import UnsafeWebhookTarget
from keel.hub import CloudEvent, Hub, Principal, StaticTokens, Store
from keel.hub._webhooks import Resolver, check_target, sign, system_resolver, verify
from tests.helpers import eventually
from tests.hub.conftest import TOKENS
from tests.hub.receiver import Receiver

ALICE = Principal("alice", "p-one", ("member",))
BACKOFF = (0.2, 0.3, 0.4, 0.5)


def ev(n: int) -> CloudEvent:
    return CloudEvent(id=f"ev-{n}", source="s", type="compute.instance.create.end", tenant="p-one")


async def states(hub: Hub, sub_id: str, acked: int) -> list[tuple[str, int]]:
    """(state, deliveries) per message once ``acked`` are acked (the receiver answers first)."""
    async with asyncio.timeout(5):
        while True:
            _, msgs = await hub.read(ALICE, sub_id, after=0, limit=None)
            if sum(m.state == "acked" for m in msgs) >= acked:
                return [(m.state, m.deliveries) for m in msgs]
            await asyncio.sleep(0.01)


@pytest.fixture
async def make_hub(store: Store) -> AsyncIterator[type[Hub]]:
    hubs: list[Hub] = []

    class TestHub(Hub):
        def __init__(self) -> None:
            super().__init__(
                store,
                StaticTokens(TOKENS),
                allow_private_webhooks=True,
                webhook_backoff=BACKOFF,
                webhook_idle_check=0.02,
                webhook_timeout=2,
            )
            hubs.append(self)

    yield TestHub
    for h in hubs:
        await h.stop()


def test_signature_matches_the_standard_webhooks_example() -> None:
    # The example from the Standard Webhooks specification's reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    got = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


async def test_fails_three_times_then_succeeds_once_in_order(make_hub: type[Hub]) -> None:
    async with Receiver(lambda n, h, b: 500 if n < 3 else 200) as rx:
        hub = make_hub()
        await hub.start()
        sub = await hub.create_subscription(ALICE, {"webhook": {"url": rx.url}})
        assert sub.webhook is not None
        await hub.ingest(ev(1))
        await hub.ingest(ev(2))
        await rx.wait_for(5)
        ids = [json.loads(r.body)["id"] for r in rx.requests]
        assert ids == ["ev-1"] * 4 + ["ev-2"]
        assert [r.status for r in rx.requests] == [500, 500, 500, 200, 200]
        accepted = [i for i, r in zip(ids, rx.requests, strict=True) if r.status == 200]
        assert accepted == ["ev-1", "ev-2"]
        for r in rx.requests:
            assert verify(sub.webhook.secret, r.headers, r.body)
        assert len({r.headers["webhook-id"] for r in rx.requests[:4]}) == 1
        gaps = [b.at - a.at for a, b in zip(rx.requests[:4], rx.requests[1:4], strict=False)]
        assert all(g >= want * 0.9 for g, want in zip(gaps, BACKOFF, strict=False)), gaps
        assert await states(hub, sub.id, 2) == [("acked", 4), ("acked", 1)]


async def test_dead_lettered_after_the_last_try_then_the_next_goes(make_hub: type[Hub]) -> None:
    def answer(n: int, headers: dict[str, str], body: bytes) -> int:
        return 200 if json.loads(body)["id"] == "ev-2" else 503

    async with Receiver(answer) as rx:
        hub = make_hub()
        await hub.start()
        sub = await hub.create_subscription(
            ALICE, {"webhook": {"url": rx.url}, "max_deliveries": 2}
        )
        await hub.ingest(ev(1))
        await hub.ingest(ev(2))
        await rx.wait_for(3)
        assert [json.loads(r.body)["id"] for r in rx.requests] == ["ev-1", "ev-1", "ev-2"]
        dead = await hub.dead_letters(ALICE, sub.id, after=0, limit=None)
        assert [m.seq for m in dead] == [1]


async def test_retry_schedule_survives_a_hub_restart(make_hub: type[Hub]) -> None:
    async with Receiver(lambda n, h, b: 500 if n == 0 else 200) as rx:
        first = make_hub()
        await first.start()
        sub = await first.create_subscription(ALICE, {"webhook": {"url": rx.url}})
        await first.ingest(ev(1))
        await rx.wait_for(1)
        await asyncio.sleep(0.1)  # let the failed attempt schedule its retry in the store
        await first.stop()  # the retry is due in BACKOFF[0] seconds; nobody is running
        second = make_hub()
        await second.start()
        await rx.wait_for(2)
        assert [r.status for r in rx.requests] == [500, 200]
        assert await states(second, sub.id, 1) == [("acked", 2)]


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.org/hook",
        "http://user:pw@example.org/hook",
        "http://@example.org/hook",
        "not a url",
        "http:///hook",
        # Numeric forms a resolver reads as 127.0.0.1 while a URL parser sees a name.
        "http://2130706433/hook",
        "http://0x7f.1/hook",
        "http://127.1/hook",
        "http://0177.0.0.1/hook",
        "http://999.1.1.1/hook",
        "http://[::1%25lo]/hook",  # zone ids
        "http://[:::]/hook",
        "http://example.org:0/hook",
        "http://example.org:65536/hook",
        "http://example.org/a b",
        "http://example.org/\u00e9",
        "http://exa\u00f1ple.org/hook",  # IDNs go as punycode (xn--)
        "https://" + "a" * 2100 + ".org/",
    ],
)
async def test_malformed_urls_are_refused_at_creation(url: str, alice: httpx.AsyncClient) -> None:
    r = await alice.post("/v1/subscriptions", json={"webhook": {"url": url}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request"


NON_PUBLIC = [
    "http://127.0.0.1:{port}/hook",
    "http://localhost:{port}/hook",
    "http://[::ffff:127.0.0.1]:{port}/hook",
    "http://[::1]:{port}/hook",
    "http://0.0.0.0:{port}/hook",
    "http://10.1.2.3:{port}/hook",
    "http://192.168.0.1:{port}/hook",
    "http://169.254.169.254:{port}/latest/meta-data",
    "http://[fe80::1]:{port}/hook",
]


@pytest.mark.parametrize("url", NON_PUBLIC)
async def test_non_public_targets_are_refused_by_the_address_check(url: str) -> None:
    with pytest.raises(UnsafeWebhookTarget):
        await check_target(url.format(port=80), allow_private=False)


async def test_a_non_public_target_is_accepted_at_creation_and_never_connected(
    store: Store,
) -> None:
    """The form is checked at creation, the address on every connection: a loopback or
    private target gets a subscription (201) and failed attempts on the retry schedule, and
    not one connection, whatever name or literal form it takes."""
    async with Receiver(lambda n, h, b: 200) as rx:
        hub = resolving_hub(store, system_resolver)  # private targets not allowed
        await hub.start()
        try:
            subs = [
                await hub.create_subscription(ALICE, {"webhook": {"url": url.format(port=rx.port)}})
                for url in NON_PUBLIC
            ]
            await hub.ingest(ev(1))
            await eventually(lambda: hub.webhooks.attempts >= len(subs), timeout=10)
            await asyncio.sleep(0.2)
            assert rx.connections == 0
            for sub in subs:
                _, msgs = await hub.read(ALICE, sub.id, after=0, limit=None)
                assert [m.state for m in msgs] == ["ready"], sub.webhook
                assert msgs[0].deliveries >= 1
        finally:
            await hub.stop()


async def test_a_name_is_not_looked_up_at_creation(alice: httpx.AsyncClient) -> None:
    """Schema-valid names that do not resolve (yet) are accepted: DNS at creation proves
    nothing about the connection, and would let a tenant make the hub resolve any name."""
    for url in ("https://0.com", "https://hooks.keel.test/x", "http://a-b_c.example.:8080/?q=1#f"):
        r = await alice.post("/v1/subscriptions", json={"webhook": {"url": url}})
        assert r.status_code == 201, r.text
        await alice.delete(f"/v1/subscriptions/{r.json()['id']}")


async def test_a_webhook_subscription_cannot_be_claimed(make_hub: type[Hub]) -> None:
    hub = make_hub()
    await hub.start()
    sub = await hub.create_subscription(ALICE, {"webhook": {"url": "http://127.0.0.1:9/x"}})
    from keel.errors import Conflict  # noqa: PLC0415

    with pytest.raises(Conflict):
        await hub.claim(ALICE, sub.id, limit=1, ttl=10)


class Dns:
    """A resolver the test controls: each lookup of a name takes the next answer (the last
    one repeats), as a rebinding DNS server would answer."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        queue = self.answers.get(host)
        if not queue:
            raise OSError(f"{host}: name unknown")
        return queue.pop(0) if len(queue) > 1 else queue[0]


def resolving_hub(store: Store, dns: Resolver, **options: Any) -> Hub:
    return Hub(
        store,
        StaticTokens(TOKENS),
        webhook_resolver=dns,
        webhook_backoff=BACKOFF,
        webhook_idle_check=0.02,
        webhook_timeout=2,
        **options,
    )


@pytest.mark.parametrize(
    "answer",
    [
        ["93.184.216.34", "10.0.0.1"],  # one bad address among good ones is enough
        ["::ffff:127.0.0.1"],  # IPv4-mapped loopback
        ["::ffff:10.1.1.1"],
        ["224.0.0.1"],  # multicast
        ["240.0.0.1"],  # reserved
        ["0.0.0.0"],
        ["100.64.0.1"],  # shared address space (carrier NAT)
        ["fc00::1"],
        [],
    ],
)
async def test_every_resolved_address_is_checked(answer: list[str]) -> None:
    dns = Dns({"hooks.keel.test": [answer]})
    with pytest.raises(UnsafeWebhookTarget):
        await check_target("https://hooks.keel.test/x", allow_private=False, resolver=dns)
    await check_target("https://hooks.keel.test/x", allow_private=True, resolver=dns)


async def test_a_public_answer_passes() -> None:
    dns = Dns({"hooks.keel.test": [["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]]})
    await check_target("https://hooks.keel.test/x", allow_private=False, resolver=dns)


async def test_connects_only_to_the_address_it_resolved(store: Store) -> None:
    # The system resolver does not know the name: a delivery that looked it up again, or let
    # httpx look it up, would fail. The Host header keeps the name.
    async with Receiver(lambda n, h, b: 200) as rx:
        dns = Dns({"hooks.keel.test": [["127.0.0.1"]]})
        hub = resolving_hub(store, dns, allow_private_webhooks=True)
        await hub.start()
        try:
            url = f"http://hooks.keel.test:{rx.port}/hook"
            await hub.create_subscription(ALICE, {"webhook": {"url": url}})
            await hub.ingest(ev(1))
            await rx.wait_for(1)
            assert rx.requests[0].headers["host"] == f"hooks.keel.test:{rx.port}"
            assert dns.lookups == ["hooks.keel.test"]  # once per connection, none at creation
        finally:
            await hub.stop()


async def test_a_name_answering_loopback_among_public_gets_no_connection(store: Store) -> None:
    async with Receiver(lambda n, h, b: 200) as rx:
        # One public address and loopback in one answer (a rebinding server's trick): refused.
        dns = Dns({"hooks.keel.test": [["93.184.216.34", "127.0.0.1"]]})
        hub = resolving_hub(store, dns)
        await hub.start()
        try:
            url = f"http://hooks.keel.test:{rx.port}/hook"
            sub = await hub.create_subscription(ALICE, {"webhook": {"url": url}})
            assert dns.lookups == []  # none at creation
            await hub.ingest(ev(1))
            await eventually(lambda: hub.webhooks.attempts >= 2)
            assert rx.connections == 0
            _, msgs = await hub.read(ALICE, sub.id, after=0, limit=None)
            assert [m.state for m in msgs] == ["ready"]  # kept for the retry schedule
        finally:
            await hub.stop()


async def test_tls_verifies_the_name_not_the_address(store: Store) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.keel.test").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    async with Receiver(lambda n, h, b: 200, tls=server_tls) as rx:
        dns = Dns({"hooks.keel.test": [["127.0.0.1"]], "other.keel.test": [["127.0.0.1"]]})
        hub = resolving_hub(store, dns, allow_private_webhooks=True, webhook_verify=client_tls)
        await hub.start()
        try:
            good = await hub.create_subscription(
                ALICE, {"webhook": {"url": f"https://hooks.keel.test:{rx.port}/hook"}}
            )
            bad = await hub.create_subscription(
                ALICE, {"webhook": {"url": f"https://other.keel.test:{rx.port}/hook"}}
            )
            await hub.ingest(ev(1))
            await rx.wait_for(1)
            await states(hub, good.id, 1)
            await eventually(lambda: hub.webhooks.attempts >= 3)
            assert len(rx.requests) == 1  # the certificate does not name other.keel.test
            _, msgs = await hub.read(ALICE, bad.id, after=0, limit=None)
            assert [m.state for m in msgs] == ["ready"]
        finally:
            await hub.stop()
