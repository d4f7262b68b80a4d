"""Topic and server names and interface versions: what reaches a broker is never syntax."""

from __future__ import annotations

import pytest

from keel.errors import ConfigError
from keel.messaging import Target
from keel.messaging._target import parse_version


@pytest.mark.parametrize("name", ["compute\n", "compute\nPUB x", " compute", "a*b", "a#b", "a%b"])
def test_names_refuse_what_a_broker_would_read_as_syntax(name: str) -> None:
    with pytest.raises(ConfigError):
        Target(name)


@pytest.mark.parametrize("name", ["host@lvm", "nova:compute", "a+2Eb", "q-agent_1.x"])
def test_names_openstack_uses_are_accepted(name: str) -> None:
    assert Target(name, server=name).server == name


@pytest.mark.parametrize("version", ["١.٠", "1.0\n", "1", "1.0.0", "9999999999.0", " 1.0"])
def test_versions_are_ascii_major_minor(version: str) -> None:
    with pytest.raises(ConfigError):
        parse_version(version)
