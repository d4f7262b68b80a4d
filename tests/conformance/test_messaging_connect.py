"""The messaging contract's ``connect_timeout`` (docs/messaging-contract.md), on every transport.

Every transport accepts ``connect_timeout`` (URL option or keyword, seconds) and its first
``connect`` to a broker it cannot reach ends within it with a retryable `TransportError`:
a refused port (a broker that is down) and a port that takes the TCP connection and never
answers (a hung broker, a half-open proxy) alike. The in-process transport has nothing to
reach and connects at once. The `transport_url` fixture chooses the backend.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest

from keel import errors, urls
from keel.messaging import connect

TIMEOUT = 1.0
SLACK = 2.5  # a loaded CI machine; without the option a hung broker held connect 10 s or more


@pytest.fixture
def refused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # closed again: a connect there is refused


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener never accepts: the kernel completes the TCP handshake (the
    backlog) and nothing ever answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        port: int = listener.getsockname()[1]
        yield port


def _moved(url: str, port: int) -> str:
    return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", url, count=1)


def _in_process(url: str) -> bool:
    return urls.parse(url).port is None


def _with_option(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


@pytest.mark.parametrize("broker", ["refused", "silent"])
async def test_connect_to_an_unreachable_broker_ends_within_connect_timeout(
    transport_url: str, refused_port: int, silent_port: int, broker: str
) -> None:
    if _in_process(transport_url):  # nothing to reach: the option is accepted, never waited on
        transport = await connect(_with_option(transport_url, f"connect_timeout={TIMEOUT}"))
        await transport.close()
        return
    port = refused_port if broker == "refused" else silent_port
    url = _with_option(_moved(transport_url, port), f"connect_timeout={TIMEOUT}")
    started = time.monotonic()
    with pytest.raises(errors.TransportError) as info:
        await connect(url)
    elapsed = time.monotonic() - started
    assert info.value.retryable
    assert elapsed < TIMEOUT + SLACK, f"connect took {elapsed:.1f}s with connect_timeout={TIMEOUT}"


async def test_connect_timeout_as_a_keyword(transport_url: str, silent_port: int) -> None:
    if _in_process(transport_url):
        transport = await connect(transport_url, connect_timeout=TIMEOUT)
        await transport.close()
        return
    started = time.monotonic()
    with pytest.raises(errors.TransportError):
        await connect(_moved(transport_url, silent_port), connect_timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + SLACK


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
async def test_a_bad_connect_timeout_is_a_config_error(transport_url: str, value: str) -> None:
    with pytest.raises(errors.ConfigError, match="connect_timeout"):
        await connect(_with_option(transport_url, f"connect_timeout={value}"))
