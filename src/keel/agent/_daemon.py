"""The agent process: ``keel agent run`` and ``python -m keel.agent run`` (the lighter one
for guests: it imports no CLI framework, so the agent starts fast on a slow guest).

Failure semantics: a bad config or channel URL exits with status 2 and one line naming it;
once serving, a broken channel is logged and, for channels the agent dials (virtio, vsock),
reopened with capped backoff; listeners keep accepting. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path

from keel.agent._agent import Agent, AgentConfig
from keel.agent._channel import (
    listen_tls,
    listen_unix,
    open_unix,
    open_virtio,
    open_vsock,
    parse_address,
)
from keel.errors import AgentError, ConfigError, KeelError


def server_tls(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """The agent's TLS: its own certificate, and controllers must present one from ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _listen(
    agent: Agent, listen: str, tls: ssl.SSLContext | None, stop: asyncio.Event
) -> None:
    addr = parse_address(listen)
    if addr.scheme == "unix":
        server = await listen_unix(addr.path, agent.serve)
    elif addr.scheme == "tls":
        if tls is None:
            raise ConfigError("--listen tls:// needs --cert, --key and --ca")
        server = await listen_tls(addr.host, addr.port, tls, agent.serve)
    else:
        raise ConfigError(f"--listen takes unix:// or tls://, not {addr.scheme}://")
    agent._log({"event": "listening", "url": listen})
    try:
        async with server:
            await stop.wait()
    finally:
        if addr.scheme == "unix":
            with contextlib.suppress(OSError):
                os.unlink(addr.path)


async def _dial(agent: Agent, dial: str) -> None:
    """Open the channel, serve it until it ends, open it again (capped backoff)."""
    addr = parse_address(dial)
    if addr.scheme not in ("vsock", "virtio", "unix"):
        raise ConfigError(f"--connect takes virtio://, vsock:// or unix://, not {addr.scheme}://")
    pause = 0.1
    quick = 0.1  # back-off for channels that end at once (virtio-serial with no host)
    while True:
        try:
            if addr.scheme == "vsock":
                channel = await open_vsock(int(addr.host), addr.port)
            elif addr.scheme == "virtio":
                channel = await open_virtio(addr.path)
            else:
                channel = await open_unix(addr.path)
        except AgentError as exc:
            agent._log({"event": "dial_failed", "url": dial, "error": str(exc)})
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
            continue
        pause = 0.1
        started = time.monotonic()
        await agent.serve(channel, dialed=True)
        if time.monotonic() - started < 0.5:
            # A virtio-serial port reads as ended while no host is connected to it: poll
            # for the host without spinning, but answer within half a second of it coming.
            await asyncio.sleep(quick)
            quick = min(quick * 2, 0.5)
        else:
            quick = 0.1


async def _serve(
    agent: Agent, listen: str | None, dial: str | None, tls: ssl.SSLContext | None
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if listen is not None:
        await _listen(agent, listen, tls, stop)
        return
    assert dial is not None
    task = asyncio.create_task(_dial(agent, dial))
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # re-raises a ConfigError from _dial


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """asyncio's own event loop, or uvloop's with ``KEEL_AGENT_LOOP=uvloop`` (``keel[agent]``).

    uvloop's loop is C where asyncio's makes some twenty Python calls per message (each tens
    of microseconds in a guest under TCG): a ping costs 48 Python calls instead of 69. But
    libuv forks to start a program where Python's subprocess uses vfork: on this host an
    exec of /bin/true took 13 ms on uvloop against 3.5 ms on asyncio, so it is not the
    default."""
    if os.environ.get("KEEL_AGENT_LOOP", "asyncio") != "uvloop":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional: the agent runs without it
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_agent(
    *,
    listen: str | None = None,
    connect: str | None = None,
    config: Path | None = None,
    instance_id: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
) -> int:
    """Run the agent on one channel until SIGTERM; the process's exit status."""
    try:
        if (listen is None) == (connect is None):
            raise ConfigError("give exactly one of --listen or --connect")
        cfg = AgentConfig.load(config) if config is not None else AgentConfig()
        if instance_id is not None:
            cfg.instance_id = instance_id
        tls = None
        if cert is not None or key is not None or ca is not None:
            if cert is None or key is None or ca is None:
                raise ConfigError("TLS needs all of --cert, --key and --ca")
            try:
                tls = server_tls(cert, key, ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load TLS files: {exc}") from None
        agent = Agent(cfg)
        # What start-up made lives as long as the agent: out of the collector's sight, a
        # collection scans only what commands allocate, not every module's objects (under
        # TCG such a collection stalls whichever ping is waiting; p99 is where it shows).
        gc.collect()
        gc.freeze()
        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(_serve(agent, listen, connect, tls))
        finally:
            agent.close()
    except KeelError as exc:
        sys.stderr.write(json.dumps({"event": "fatal", "error": str(exc)}) + "\n")
        return 2
    return 0


HELP = {
    "listen": "unix:///path or tls://host:port to accept controllers",
    "connect": "virtio:///dev/virtio-ports/NAME, vsock://2:PORT or unix:///path",
    "config": "TOML config (allow, deny, audit_log)",
    "instance_id": "overrides the config's",
    "cert": "TLS certificate naming this instance",
    "key": "its private key",
    "ca": "CA that signs controller certificates",
}
