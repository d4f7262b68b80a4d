"""`keel hub serve` as operators run it: bad options are refused with the reason, and an
OpenStack notification the hub received but could not commit is not lost when the hub is
killed: RabbitMQ still holds it and hands it to the restarted hub.

Deterministic: the test holds the SQLite write lock, so the hub's commit fails and is retried
(``event=hub.commit_retry`` on stderr says the hub holds the delivery, unacknowledged); the
hub is killed with SIGKILL there, the lock released, the hub started again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sqlite3
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from keel.cli import app
from keel.errors import ConfigError
from keel.hub import SQLiteStore, StaticTokens
from tests.hub.conftest import TOKENS
from tests.oslo import notification_transport, oslo_context, oslo_messaging
from tests.servers import server_url

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # oslo's stack about itself
]


@pytest.fixture(autouse=True)
def _keel_logging() -> Iterator[None]:
    # The command configures the "keel" logger onto CliRunner's stderr, closed after the
    # run; later tests in this process must not log into it.
    root = logging.getLogger("keel")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--store", "mysql://db/hub"], "no store backend handles mysql://"),
        (["--store", "sqlite:///no/such/dir/hub.db"], "directory /no/such/dir does not exist"),
        (["--oslo", "nats://127.0.0.1:4222"], "expected rabbit://"),
        (["--transport", "kafka://127.0.0.1"], "no transport backend handles kafka://"),
        (["--oslo", "rabbit://127.0.0.1/", "--oslo-topic", "bad topic!"], "bad topic!"),
    ],
)
def test_bad_options_are_refused_with_the_reason(
    tmp_path: Path, args: list[str], says: str
) -> None:
    tokens = tmp_path / "tokens.json"
    StaticTokens(TOKENS).write(tokens)
    base = ["hub", "serve", "--store", f"sqlite:///{tmp_path}/hub.db", "--tokens", str(tokens)]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "password", "says"),
    [
        ([], "", "give exactly one of --tokens FILE and --keystone URL"),
        (["--tokens", "t.json", "--keystone", "http://k/v3"], "", "exactly one of"),
        (["--keystone", "http://127.0.0.1:5000/v3"], "", "KEEL_KEYSTONE_PASSWORD"),
        (["--keystone", "ftp://k/v3"], "pw", "expected Keystone's v3 URL"),
    ],
)
def test_auth_options_are_refused_with_the_reason(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    password: str,
    says: str,
) -> None:
    monkeypatch.setenv("KEEL_KEYSTONE_PASSWORD", password)
    monkeypatch.chdir(tmp_path)
    StaticTokens(TOKENS).write(tmp_path / "t.json")
    base = ["hub", "serve", "--store", f"sqlite:///{tmp_path}/hub.db"]
    result = CliRunner().invoke(app, [*base, *args])
    assert result.exit_code == 2, result.output
    assert says in result.output


def test_a_bad_token_file_is_refused(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"t": {"user": "u"}}')
    result = CliRunner().invoke(
        app, ["hub", "serve", "--store", f"sqlite:///{tmp_path}/h.db", "--tokens", str(tokens)]
    )
    assert result.exit_code == 2
    assert "user and project must be non-empty strings" in result.output


class Serve:
    """`python -m keel hub serve` in a subprocess; its structured log lines on stderr."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.url = ""

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "keel",
            "hub",
            "serve",
            *self.args,
            stderr=asyncio.subprocess.PIPE,
        )
        line = await self.wait_for("event=hub.serving", 30)
        found = re.search(r"url=(http://\S+)", line)
        assert found is not None, line
        self.url = found.group(1)

    async def wait_for(self, text: str, timeout: float) -> str:
        assert self.proc is not None
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, "keel hub serve exited:\n" + "".join(self.lines)
                line = raw.decode()
                self.lines.append(line)
                if text in line:
                    return line

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        await self.wait_for("event=hub.stopped", 30)
        return await asyncio.wait_for(self.proc.wait(), 30)


async def test_killed_before_the_commit_the_notification_is_redelivered(tmp_path: Path) -> None:
    rabbit = server_url("rabbitmq")
    tokens = tmp_path / "tokens.json"
    StaticTokens(TOKENS).write(tokens)
    db = tmp_path / "hub.db"
    run = uuid.uuid4().hex[:8]
    # oslo's notifier declares "<topic>.info" and queue names are global on the broker: a
    # topic of this test's own keeps other tests' queues of the real names out of its way.
    topic = f"notifications-{run}"
    args = ["--store", f"sqlite:///{db}", "--tokens", str(tokens), "--oslo", rabbit]
    args += ["--oslo-topic", topic, "--pool", f"keel-hub-{run}", "--port", "0"]
    hub = Serve(args)
    await hub.start()
    async with httpx.AsyncClient(
        base_url=hub.url, headers={"X-Auth-Token": "tok-alice"}, timeout=10
    ) as alice:
        created = await alice.post("/v1/subscriptions", json={"types": ["compute.*"]})
        assert created.status_code == 201, created.text
        sub = created.json()["id"]

    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the hub's writes now fail with "database is locked"
    try:
        with notification_transport(rabbit) as oslo:
            notifier = oslo_messaging.Notifier(
                oslo, publisher_id="compute.host1", driver="messagingv2", topics=[topic]
            )
            ctxt = oslo_context.RequestContext(user_id="alice", project_id="p-one")
            payload: dict[str, Any] = {"instance_id": "i-7", "tenant_id": "p-one"}
            await asyncio.to_thread(notifier.info, ctxt, "compute.instance.create.end", payload)
        await hub.wait_for("event=hub.commit_retry", 30)
        await hub.kill()
    finally:
        lock.execute("ROLLBACK")
        lock.close()

    again = Serve(args)
    await again.start()
    try:
        async with httpx.AsyncClient(
            base_url=again.url, headers={"X-Auth-Token": "tok-alice"}, timeout=10
        ) as alice:
            events: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                while not events:
                    page = await alice.get(f"/v1/subscriptions/{sub}/events?after=0")
                    events = [m["event"] for m in page.json()["messages"]]
                    await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a duplicate, if any, would have landed by now
            page = await alice.get(f"/v1/subscriptions/{sub}/events?after=0")
            events = [m["event"] for m in page.json()["messages"]]
        assert [(e["type"], e["subject"], e["tenant"]) for e in events] == [
            ("compute.instance.create.end", "i-7", "p-one")
        ]
    finally:
        assert await again.interrupt() == 0


def test_store_urls() -> None:
    from keel.hub._serve import store_from_url  # noqa: PLC0415
    from keel.hub.stores.postgres import PostgresStore  # noqa: PLC0415

    pg = store_from_url("postgresql://keel:secret@127.0.0.1:5432/keel")
    assert isinstance(pg, PostgresStore)
    assert pg.url == "postgresql://keel:secret@127.0.0.1:5432/keel"
    lite = store_from_url("sqlite:///tmp/keel-hub-test.db")
    assert isinstance(lite, SQLiteStore)
    assert lite.path == "/tmp/keel-hub-test.db"
    with pytest.raises(ConfigError, match="name the database file"):
        store_from_url("sqlite://")
