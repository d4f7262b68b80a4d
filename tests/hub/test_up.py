"""`keel up` in a subprocess: prints the URL and two tokens, serves two tenants, stops on SIGINT."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest

from tests.hub.sse import frames


async def first_events(client: httpx.AsyncClient, sub_id: str, n: int) -> list[dict[str, str]]:
    got = []
    async with client.stream("GET", f"/v1/subscriptions/{sub_id}/stream?after=0") as r:
        async for f in frames(r):
            if f.event == "cloudevent":
                got.append(f.json())
                if len(got) == n:
                    break
    return got


async def test_keel_up_serves_two_tenants_and_stops_on_sigint(tmp_path: object) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keel",
        "up",
        "--port",
        "0",
        "--interval",
        "0.05",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        async with asyncio.timeout(30):
            while not lines or "Ctrl-C stops" not in lines[-1]:
                line = (await proc.stdout.readline()).decode()
                assert line, "keel up exited early:\n" + "".join(lines)
                lines.append(line)
        text = "".join(lines)
        url = re.search(r"dashboard: (http://127\.0\.0\.1:\d+)/", text)
        tokens = dict(re.findall(r"tenant (\S+) \(\w+\): token (\S+)", text))
        assert url is not None, text
        assert set(tokens) == {"demo-alpha", "demo-beta"}
        # The map's printed URL works as it is: it carries a token, as the dashboard's does.
        map_url = re.search(r"live service map: (\S+)", text)
        assert map_url is not None
        assert map_url.group(1).endswith("/map#token=" + tokens["demo-alpha"])
        async with httpx.AsyncClient(base_url=url.group(1), timeout=10) as anon:
            page = await anon.get("/")
            assert page.status_code == 200
            assert "EventSource" in page.text
        for project, token in tokens.items():
            async with httpx.AsyncClient(
                base_url=url.group(1), headers={"X-Auth-Token": token}, timeout=10
            ) as c:
                subs = (await c.get("/v1/subscriptions")).json()["subscriptions"]
                assert len(subs) == 1
                events = await asyncio.wait_for(first_events(c, subs[0]["id"], 4), 20)
                assert {e["tenant"] for e in events} == {project}
                assert all(e["type"].startswith("compute.instance.") for e in events)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            rest = (await proc.stdout.read()).decode()
            assert await proc.wait() == 0, rest
        assert "keel up: stopped" in rest
        assert "Traceback" not in rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("command", [["up"], ["hub", "serve", "--store", "sqlite:///{tmp}/h.db"]])
async def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, command: list[str]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    (tmp_path / "tokens.json").write_text("{}")
    args = [c.format(tmp=tmp_path) for c in command]
    if command[0] == "hub":
        args += ["--tokens", str(tmp_path / "tokens.json")]
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keel",
            *args,
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(60):
            out = (await proc.communicate())[0].decode()
    finally:
        taken.close()
    assert proc.returncode == 2, out
    assert "Traceback" not in out
    assert f"port {port} on 127.0.0.1 is taken" in out
