"""The agent as a separate process over TCP with mutual TLS, dialing in over a unix socket
(as over vsock), and what vsock does on this machine."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

import pytest
import trustme
from agent_helpers import AgentProcess

from keel.agent import AgentClient, listen_for_agents
from keel.agent._channel import listen_vsock
from keel.errors import (
    AgentIdentityMismatch,
    AgentUnavailable,
    ChannelUnsupported,
    ConfigError,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.tmp = tmp
        self.ca_file = tmp / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(self, name: str) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(name)
        cert_file, key_file = self.tmp / f"{name}.crt", self.tmp / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(cert_file), append=True)
        cert.private_key_pem.write_to_path(str(key_file))
        return cert_file, key_file

    def client_context(self, name: str | None = "controller") -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.check_hostname = False  # the instance id is checked by Keel, by name, below
        if name is not None:
            cert, key = self.issue(name)
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    work = tmp_path_factory.mktemp("tls")
    pki = Pki(work)
    cert, key = pki.issue("i-0001")
    port = free_port()
    proc = AgentProcess(
        work,
        "--listen",
        f"tls://127.0.0.1:{port}",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--ca",
        str(pki.ca_file),
    )
    ready = work / "ready"
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            ready.touch()
            break
        except OSError:
            if not proc.alive():
                pytest.fail(proc.output())
            time.sleep(0.05)
    yield pki, f"tls://127.0.0.1:{port}", proc
    proc.stop()


async def test_tls_agent_with_its_own_certificate(tls_agent) -> None:  # type: ignore[no-untyped-def]
    pki, url, proc = tls_agent
    async with await AgentClient.connect(
        url, ssl_context=pki.client_context(), instance_id="i-0001"
    ) as client:
        await client.ping()
        result = await client.exec(["echo", "over tls"])
        assert result.stdout == b"over tls\n"
        data = b"z" * (3 * 1024 * 1024)
        target = proc.workdir / "tls.bin"
        await client.put_file(str(target), data)
        assert await client.get_file(str(target)) == data
        assert "tls:" in client.peer
    assert any('"who": "tls:controller' in line for line in proc.audit_lines())


async def test_tls_refuses_an_agent_naming_another_instance(tls_agent) -> None:  # type: ignore[no-untyped-def]
    pki, url, _ = tls_agent
    with pytest.raises(AgentIdentityMismatch) as info:
        await AgentClient.connect(url, ssl_context=pki.client_context(), instance_id="i-0002")
    assert info.value.expected == "i-0002"
    assert info.value.presented == ["i-0001"]


async def test_tls_agent_refuses_a_controller_without_a_certificate(tls_agent) -> None:  # type: ignore[no-untyped-def]
    pki, url, _ = tls_agent

    async def attempt() -> None:
        async with await AgentClient.connect(
            url, ssl_context=pki.client_context(None), instance_id="i-0001", timeout=5
        ) as client:
            await client.ping()

    with pytest.raises(AgentUnavailable):
        await attempt()


async def test_tls_refuses_an_agent_from_another_ca(tls_agent) -> None:  # type: ignore[no-untyped-def]
    _, url, _ = tls_agent
    other = Pki(Path(tls_agent[2].workdir) / "..")
    with pytest.raises(AgentUnavailable, match="certificate"):
        await AgentClient.connect(url, ssl_context=other.client_context(), instance_id="i-0001")


async def test_tls_needs_context_and_instance(tls_agent) -> None:  # type: ignore[no-untyped-def]
    _, url, _ = tls_agent
    with pytest.raises(ConfigError):
        await AgentClient.connect(url)


async def test_agent_dials_in_and_host_learns_its_peer(tmp_path: Path) -> None:
    """The agent's --connect path (virtio-serial device, or vsock to the host), with the
    host listening on a unix socket in place of the hypervisor's."""
    sock = tmp_path / "host.sock"
    seen: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def on_agent(client: AgentClient) -> None:
        result = await client.exec(["echo", "dialed in"])
        await seen.put((client.peer, result.stdout))

    server = await listen_for_agents(f"unix://{sock}", on_agent)
    proc = AgentProcess(tmp_path, "--connect", f"unix://{sock}")
    try:
        async with server:
            peer, out = await asyncio.wait_for(seen.get(), 20)
            assert out == b"dialed in\n"
            assert peer.startswith("unix:uid=")
            # The agent dials again when the host drops it (as after a host restart).
            peer, out = await asyncio.wait_for(seen.get(), 20)
            assert out == b"dialed in\n"
    finally:
        proc.stop()


async def test_vsock_where_the_kernel_has_it(tmp_path: Path) -> None:
    """vsock needs vhost_vsock or vsock_loopback; on machines without them binding the
    loopback CID fails, and Keel says so with ChannelUnsupported (asserted here). Then the
    unix and TLS tests above carry the suite."""
    port = 20000 + free_port() % 10000

    unsupported: ChannelUnsupported | None = None
    try:
        server = await listen_vsock(port, lambda ch: ch.close(), cid=1)
    except ChannelUnsupported as exc:
        unsupported = exc
    else:
        server.close()
    if unsupported is not None:
        assert unsupported.channel == "vsock"
        assert "AF_VSOCK" in str(unsupported)
        print(f"vsock is not available on this machine: {unsupported}")  # shown with -rA
        return
    # vsock works here: run the agent over it end to end.
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def record(client: AgentClient) -> None:
        await client.ping()
        await seen.put(client.peer)

    server = await listen_for_agents(f"vsock://1:{port}", record)
    proc = AgentProcess(tmp_path, "--connect", f"vsock://1:{port}")
    try:
        async with server:
            assert (await asyncio.wait_for(seen.get(), 20)).startswith("vsock:cid=")
    finally:
        proc.stop()
