"""The service runner in a real process: SIGTERM drains, a second signal stops at once, and
the health probe tells an orchestrator when to stop sending work."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from keel import errors
from keel.messaging import RequestContext, RPCClient, RPCServer, ServerState, Target, connect, serve
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]


def _spawn(slow: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.messaging.serve_proc", str(slow)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _expect(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith(prefix), f"expected {prefix!r}, got {line!r}"
    return line


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_sigterm_drains_and_the_running_call_completes() -> None:
    proc = _spawn(1.5)
    try:
        port = int(_expect(proc, "health").split()[1])
        assert _health(port)[0] == 200
        _expect(proc, "started")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        code, detail = _health(port)
        assert code == 503
        assert detail["parts"] == {"svc-1": "draining"}
        assert _expect(proc, "reply") == "reply ok"
        _expect(proc, "exited")
        assert proc.wait(10) == 0
    finally:
        _reap(proc)


def test_second_signal_stops_at_once_and_tells_the_caller() -> None:
    proc = _spawn(60)
    try:
        _expect(proc, "health")
        _expect(proc, "started")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert _expect(proc, "error") == "error ServerDraining"
        _expect(proc, "exited")
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 10
    finally:
        _reap(proc)


def test_health_endpoint_paths() -> None:
    proc = _spawn(60)
    try:
        port = int(_expect(proc, "health").split()[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"keel_rpc_server_serving" in response.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=5) as response:
            assert response.status == 200
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)
        except urllib.error.HTTPError as error:
            assert error.code == 404
            assert "healthz" in json.loads(error.read())["error"]
    finally:
        _reap(proc)


class _Slow:
    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def slow(self, ctx: RequestContext) -> str:
        self.started.set()
        await asyncio.sleep(30)
        return "ok"


async def test_a_zero_drain_timeout_means_zero() -> None:
    """serve(drain_timeout=0): the first signal cancels what runs, it does not wait 25 s."""
    transport = await connect(f"memory://serve-zero-{uuid.uuid4().hex[:8]}")
    endpoint = _Slow()
    server = RPCServer(transport, Target("svc"), [endpoint])
    running = asyncio.ensure_future(serve([server], drain_timeout=0))
    await eventually(lambda: server.state is ServerState.SERVING)
    call = asyncio.ensure_future(RPCClient(transport, Target("svc"), timeout=60).call(None, "slow"))
    await endpoint.started.wait()
    began = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)  # serve() installed its handler before starting parts
    with pytest.raises(errors.ServerDraining):
        await asyncio.wait_for(call, 10)
    await asyncio.wait_for(running, 10)
    assert time.monotonic() - began < 3
    await transport.close()
