"""``keel agent run``: the agent process.

Failure semantics: a bad config or channel URL exits with status 2 and one line naming it;
once serving, a broken channel is logged and, for channels the agent dials (virtio, vsock),
reopened with capped backoff; listeners keep accepting. SIGTERM stops it cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

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

app = typer.Typer(
    help="The Keel guest agent.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)


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
        await agent.serve(channel)
        if time.monotonic() - started < 0.1:
            await asyncio.sleep(0.1)  # a channel that ends at once must not spin


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


@app.command()
def run(
    *,
    listen: Annotated[
        str | None, typer.Option(help="unix:///path or tls://host:port to accept controllers")
    ] = None,
    connect: Annotated[
        str | None,
        typer.Option(help="virtio:///dev/virtio-ports/NAME, vsock://2:PORT or unix:///path"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML config (allow, deny, audit_log)")
    ] = None,
    instance_id: Annotated[str | None, typer.Option(help="overrides the config's")] = None,
    cert: Annotated[Path | None, typer.Option(help="TLS certificate naming this instance")] = None,
    key: Annotated[Path | None, typer.Option(help="its private key")] = None,
    ca: Annotated[Path | None, typer.Option(help="CA that signs controller certificates")] = None,
) -> None:
    """Run the guest agent on one channel until SIGTERM."""
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
        try:
            asyncio.run(_serve(agent, listen, connect, tls))
        finally:
            agent.close()
    except KeelError as exc:
        sys.stderr.write(json.dumps({"event": "fatal", "error": str(exc)}) + "\n")
        raise typer.Exit(2) from None


@app.callback()
def _group() -> None:
    """The Keel guest agent."""
