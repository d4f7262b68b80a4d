"""The live service map: `/v1/map` and its SSE stream from the tap's database, and the `/map`
page of `keel up` in headless Chromium, updated over that one stream only."""

from __future__ import annotations

import asyncio
import io
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, expect

from keel.hub import Hub, HubServer, SQLiteStore, StaticTokens
from keel.hub._map_feed import MapFeed
from keel.hub._up import run_up
from keel.map import demo
from keel.map import disable as map_disable
from keel.map import enable as map_enable
from keel.messaging import RPCClient, RPCServer, Target, connect
from tests.hub.conftest import TOKENS
from tests.hub.sse import frames
from tests.hub.test_dashboard import browser  # noqa: F401 - the Chromium fixture

DEMO_SERVICES = {"api", "billing", "compute", "image", "network"}


@pytest.fixture
async def mapped_server(tmp_path: Path) -> AsyncIterator[tuple[HubServer, Path]]:
    db = tmp_path / "map.db"
    await demo.run(f"memory://map-page-{uuid.uuid4().hex[:6]}", db, rounds=3)
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, StaticTokens(TOKENS))
    await hub.start()
    feed = MapFeed(db, interval=0.1)
    await feed.start()
    server = HubServer(hub, map_feed=feed, heartbeat=0.5)
    await server.start()
    yield server, db
    await server.stop()
    await hub.stop()
    await store.close()


async def probe_image(db: Path) -> None:
    """A caller the map has not seen ("probe") asks image for its list, with the tap on."""
    transport = await connect(f"memory://probe-{uuid.uuid4().hex[:6]}")
    map_enable(db)
    image = RPCServer(transport, Target("image"), [demo.Image()], service="image")
    try:
        await image.start()
        probe = RPCClient(transport, Target("image"), timeout=5, service="probe")
        await probe.call(None, "list")
        await image.stop()
    finally:
        map_disable()
        await transport.close()


async def test_map_api_answers_the_recorded_graph_and_its_smells(
    mapped_server: tuple[HubServer, Path],
) -> None:
    server, _ = mapped_server
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        r = await c.get("/v1/map", headers={"X-Auth-Token": "tok-bob"})
        assert r.status_code == 200
        snap = r.json()
        assert snap["version"] >= 1
        graph = snap["map"]
        assert set(graph["services"]) == DEMO_SERVICES
        kinds = {s["kind"] for s in graph["smells"]}
        assert {"cycle", "fan-in", "version-skew"} <= kinds
        calls = {(e["caller"], e["callee"], e["method"]) for e in graph["edges"]}
        assert ("api", "compute", "boot") in calls
        assert ("compute", "network", "allocate") in calls

        anonymous = await c.get("/v1/map")
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "unauthorized"
        refused = await c.get("/v1/map/stream?access_token=nope")
        assert refused.status_code == 401


async def test_map_stream_sends_the_map_then_each_change(
    mapped_server: tuple[HubServer, Path],
) -> None:
    server, db = mapped_server
    versions: list[int] = []
    services: list[set[str]] = []
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as c,
        c.stream("GET", "/v1/map/stream?access_token=tok-alice") as r,
    ):
        assert r.status_code == 200
        async with asyncio.timeout(15):
            async for f in frames(r):
                if f.event != "map":
                    continue
                snap = f.json()
                versions.append(snap["version"])
                services.append(set(snap["map"]["services"]))
                if len(versions) == 1:
                    await probe_image(db)
                if "probe" in services[-1]:
                    break
    assert versions == sorted(versions)
    assert len(set(versions)) == len(versions)
    assert services[0] == DEMO_SERVICES
    assert "probe" in services[-1]


async def test_a_hub_without_a_map_says_so(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "hub.db")
    await store.open()
    hub = Hub(store, StaticTokens(TOKENS))
    await hub.start()
    try:
        async with HubServer(hub) as server, httpx.AsyncClient(base_url=server.url) as c:
            r = await c.get("/v1/map", headers={"X-Auth-Token": "tok-alice"})
            assert r.status_code == 404
            assert "records no service map" in r.json()["error"]["message"]
    finally:
        await hub.stop()
        await store.close()


async def test_keel_up_map_page_is_live_without_polling(
    browser: Browser,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    out = io.StringIO()
    stop = asyncio.Event()
    up = asyncio.create_task(
        run_up(port=0, data_dir=tmp_path / "up", interval=0.05, out=out, stop=stop)
    )
    try:
        async with asyncio.timeout(30):
            while "Ctrl-C stops" not in out.getvalue():
                assert not up.done(), out.getvalue()
                await asyncio.sleep(0.05)
        text = out.getvalue()
        found = re.search(r"live service map: (http://127\.0\.0\.1:\d+)/map", text)
        assert found is not None, text
        token = re.findall(r"token (\S+)", text)[0]
        page = await browser.new_page()
        requests: list[str] = []
        page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
        await page.goto(f"{found.group(1)}/map#token={token}")
        await expect(page.locator("#status")).to_have_text("live", timeout=10_000)
        for name in (*DEMO_SERVICES, "keel-hub"):
            await expect(page.locator(f'g[data-service="{name}"]')).to_be_visible(timeout=10_000)
        await expect(page.locator('#smells li[data-kind="cycle"]')).to_contain_text("compute")
        await expect(page.locator('#smells li[data-kind="fan-in"]')).to_contain_text("image")
        await expect(page.locator('#smells li[data-kind="version-skew"]')).to_be_visible()
        await expect(page.locator('path[data-edge="compute>keel-hub>notify"]')).to_have_count(1)
        settled = len(requests)

        # A service the page has never seen starts calling: it appears without a reload.
        transport = await connect("memory://keel-up")
        probe = RPCClient(transport, Target("image"), timeout=5, service="probe")
        await probe.call(None, "list")
        await expect(page.locator('g[data-service="probe"]')).to_be_visible(timeout=10_000)
        await expect(page.locator('tr[data-edge="probe>image>list"]')).to_have_count(1)
        assert len(requests) == settled, requests[settled:]
        assert [r for r in requests if "/v1/" in r] == [
            f"GET {found.group(1)}/v1/map/stream?access_token={token}"
        ]
        await transport.close()
    finally:
        stop.set()
        await asyncio.wait_for(up, 30)
    assert "keel up: stopped" in out.getvalue()
