"""Fixtures of the oslo.messaging driver tests (see support.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.oslo import cfg
from tests.oslo_driver.support import BROKER_URLS, KEEL_URLS, Oslo


@pytest.fixture(params=sorted(KEEL_URLS))
def keel_url(request: pytest.FixtureRequest) -> str:
    return KEEL_URLS[request.param]()


@pytest.fixture(params=sorted(BROKER_URLS))
def broker_url(request: pytest.FixtureRequest) -> str:
    """Keel's transports that have a broker to lose (memory:// is in the process)."""
    return BROKER_URLS[request.param]()


@pytest.fixture
def conf() -> Any:
    # The global CONF: oslo registers some options (tracing) there only.
    cfg.CONF([], project="keel-tests")
    return cfg.CONF


@pytest.fixture
def topic() -> str:
    return f"oslo-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def oslo(conf: Any, keel_url: str) -> Iterator[Oslo]:
    found = Oslo(conf, keel_url)
    yield found
    found.close()
