"""The default ports of scripts/servers.d stay below Linux's ephemeral range (32768-60999):
a port in it may be held by any outbound connection's local end, and twice a RabbitMQ failed
to start with "dist_port_already_used" on its default 46720. Defaults shared on purpose (the
Keystone Horizon talks to, the Redis Zaqar stores in) name the same variable; no two
variables share a default."""

from __future__ import annotations

import re
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "servers.d"
_DEFAULT = re.compile(r"\$\{(KEEL_[A-Z_]*PORT):-(\d+)\}")
_EPHEMERAL_LOW = 32768


def _defaults() -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for script in sorted(SCRIPTS.glob("*.sh")):
        for name, port in _DEFAULT.findall(script.read_text()):
            found.setdefault(name, set()).add(int(port))
    return found


def test_every_default_port_is_below_the_ephemeral_range() -> None:
    found = _defaults()
    assert found, "no KEEL_*_PORT defaults found"
    high = {name: ports for name, ports in found.items() if max(ports) >= _EPHEMERAL_LOW}
    assert not high, f"defaults in the ephemeral range: {high}"


def test_a_variable_has_one_default_and_defaults_do_not_collide() -> None:
    found = _defaults()
    assert all(len(ports) == 1 for ports in found.values()), found
    by_port: dict[int, list[str]] = {}
    for name, ports in found.items():
        by_port.setdefault(next(iter(ports)), []).append(name)
    assert not {p: n for p, n in by_port.items() if len(n) > 1}


def test_rabbitmq_dist_port_default_is_below_the_range_too() -> None:
    text = (SCRIPTS / "rabbitmq.sh").read_text()
    [port] = re.findall(r"KEEL_RABBITMQ_PORT:-(\d+)", text)
    [offset] = re.findall(r"RABBITMQ_PORT - (\d+)\)", text)
    assert 1024 < int(port) - int(offset) < _EPHEMERAL_LOW
