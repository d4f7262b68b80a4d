"""Run by tests/test_servers_script.py in a pytest of its own: starts the Redis server."""

from tests.servers import server_url


def test_uses_redis() -> None:
    assert server_url("redis").startswith("redis://")
