"""The driver's names and URLs: injective, always valid Keel names, hostile input refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel.errors import ConfigError
from keel.messaging import Target
from keel.messaging.oslo_driver._names import DriverOptions, escape, parse_version, rpc_topic

names = st.text(min_size=1, max_size=40)


@given(names, names)
def test_escaping_is_injective(a: str, b: str) -> None:
    if a != b:
        assert escape(a) != escape(b)


@given(names)
def test_an_escaped_name_is_a_keel_name(name: str) -> None:
    escaped = escape(name)
    if len(escaped) <= 200:
        assert Target(escaped, server=escaped).topic == escaped


@given(names, names, names, names)
def test_exchange_and_topic_never_blur(e1: str, t1: str, e2: str, t2: str) -> None:
    if (e1, t1) != (e2, t2):
        assert rpc_topic(e1, t1) != rpc_topic(e2, t2)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("compute", "compute"),
        ("cinder-volume", "cinder-volume"),
        ("host@lvm#pool", "host@lvm+23pool"),
        ("q-agent:x", "q-agent+3Ax"),
        ("a\nb", "a+0Ab"),
        (".hidden", "_+_.hidden"),
        ("é", "_+_+C3+A9"),
    ],
)
def test_escapes(name: str, escaped: str) -> None:
    assert escape(name) == escaped


@pytest.mark.parametrize("version", [None, "1", "1.0", "2.13"])
def test_versions(version: str | None) -> None:
    assert parse_version(version).count(".") == 1


@pytest.mark.parametrize("version", ["1.2.3", "١.٠", "x", "1.", "-1.0", "1.0\n"])
def test_bad_versions(version: str) -> None:
    with pytest.raises(ConfigError):
        parse_version(version)


def test_url_keeps_what_keel_reads_and_drops_the_driver_options() -> None:
    options = DriverOptions.from_oslo(
        "keel+rabbit",
        "keel+rabbit://u:p%40ss@h1:5672/vhost?heartbeat=5&drain_timeout=3&legacy=send",
        {"heartbeat": "5", "drain_timeout": "3", "legacy": "send"},
    )
    assert options.url == "rabbit://u:p%40ss@h1:5672/vhost?heartbeat=5"
    assert (options.scheme, options.drain_timeout, options.legacy) == ("rabbit", 3.0, "send")
    exchange = options.with_exchange("nova", durable=False)
    assert exchange.endswith("heartbeat=5&exchange=nova&exchange_durable=false")


@pytest.mark.parametrize(
    ("transport", "query"),
    [
        ("keel", {}),
        ("keel+", {}),
        ("keel+rabbit", {"drain_timeout": "nan"}),
        ("keel+rabbit", {"drain_timeout": "inf"}),
        ("keel+rabbit", {"drain_timeout": "-1"}),
        ("keel+rabbit", {"drain_timeout": "soon"}),
    ],
)
def test_bad_urls(transport: str, query: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        DriverOptions.from_oslo(transport, f"{transport}://h/", query)
