"""The Redis pipe's RESP packer writes exactly what redis-py's own packer writes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from keel.messaging.transports.redis import _pack

arg = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
# A command name first (redis-py splits a name with spaces into words; Keel's have none).
command = st.tuples(st.sampled_from(["EVALSHA", "XACK", "XDEL"]), st.lists(arg, max_size=8)).map(
    lambda named: (named[0], *named[1])
)


@given(st.lists(command, min_size=1, max_size=5))
def test_pack_matches_redis_py(commands: list[tuple[object, ...]]) -> None:
    reference = b"".join(Connection().pack_commands(commands))
    assert _pack(commands) == reference


@pytest.mark.parametrize("bad", [1.5, None, True, object()])
def test_pack_refuses_what_the_pipe_never_sends(bad: object) -> None:
    with pytest.raises(TypeError):
        _pack([("SET", "k", bad)])
