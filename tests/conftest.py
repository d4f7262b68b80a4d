"""Checks for the whole test tree, and the end of a session: the servers this session
started (see tests/servers.py) are stopped, unless KEEL_KEEP_SERVERS is set.

No task's exception may go unobserved anywhere in Keel: asyncio reports a task or future
whose exception nobody retrieved ("Task exception was never retrieved") only through its
loop's exception handler, which logs it on the ``asyncio`` logger when the object is
collected. A handler here records those reports and the test then fails in its teardown with
what asyncio said. Most such objects are freed (and reported) the moment they are dropped,
inside the test that leaked them; for those caught in reference cycles each test ends with a
collection of the young generations, and the last test of each module with a full one (a
full collection costs tens of milliseconds here: after every test it would add minutes to
CI). The end of the session collects once more.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator

import pytest

from tests import servers

_NEVER_RETRIEVED = "exception was never retrieved"


class _Unretrieved(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _NEVER_RETRIEVED in message:
            detail = ""
            if record.exc_info and record.exc_info[1] is not None:
                detail = f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            self.found.append(message.splitlines()[0] + detail)

    def take(self) -> list[str]:
        found, self.found = self.found, []
        return found


_handler = _Unretrieved()


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("asyncio").addHandler(_handler)


def pytest_unconfigure(config: pytest.Config) -> None:
    logging.getLogger("asyncio").removeHandler(_handler)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    yield
    last_of_module = nextitem is None or nextitem.path != item.path
    if last_of_module:
        gc.collect()
    else:
        gc.collect(1)
    found = _handler.take()
    if found:
        where = "this test" + (" or an earlier one of its module" if last_of_module else "")
        pytest.fail(
            f"asyncio reported exceptions nobody retrieved ({where}: a task or future died "
            "unobserved):\n  " + "\n  ".join(found),
            pytrace=False,
        )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()
    found = _handler.take()
    if found:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nasyncio reported exceptions nobody retrieved after the last test:")
        for line in found:
            print("  " + line)
    if os.environ.get("KEEL_KEEP_SERVERS", "") not in ("", "0"):
        return
    stopped = servers.stop_started()
    if stopped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"stopped the servers this run started: {' '.join(stopped)}")
