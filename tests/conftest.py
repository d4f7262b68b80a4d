"""Session-wide: stop the servers this test session started (see tests/servers.py)."""

from __future__ import annotations

import os

import pytest

from tests import servers


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("KEEL_KEEP_SERVERS", "") not in ("", "0"):
        return
    stopped = servers.stop_started()
    if stopped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"stopped the servers this run started: {' '.join(stopped)}")
