"""tooz's own test suite, unchanged, against Keel's tooz driver on every Keel backend.

``tooz/tests/test_coordination.py`` from the installed wheel runs in a subprocess with
``TOOZ_TEST_URL=keel+<backend>://...`` (how tooz's CI selects a driver). Every test must pass.
tooz turns "not implemented" into a skip; here a skip fails the run unless it is one of the
few below, each skipped by the suite's own rule for a reason that is not a missing feature.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coord_support import BACKENDS
from tests.servers import server_url

# Skipped by tooz's suite itself, on every Keel backend, for these reasons (docs/openstack.md):
ALLOWED_SKIPS = {
    # It expels a *live* client that does not call heartbeat(): tooz's redis and memcached
    # model. Keel renews leases itself (a live holder keeps them, a dead one loses them within
    # ttl), so Keel declares NON_TIMEOUT_BASED as tooz's zookeeper and etcd3gw drivers do, and
    # the suite skips it as it does for them. tests/tooz_driver/test_tooz_face.py checks
    # the safety half: a *dead* member leaves within its ttl and watchers see it leave.
    "test_timeout": "This driver is not based on timeout",
    # Runs only for isinstance(coord, (Etcd3Driver, MemcachedDriver, RedisDriver)) and calls
    # their private _destroy_group; no other driver can pass it.
    "test_watch_join_group_disappear": "only works with coordinators",
}
# SQLite is one file on one host: tooz's "bad host" test applies to distributed drivers only.
ALLOWED_SQLITE_SKIPS = {"test_connection_error_bad_host": "not distributed across hosts"}


def _url(backend: str, tmp: Path) -> str:
    if backend == "sqlite":
        return f"keel+sqlite://{tmp}/tooz.db"
    return "keel+" + server_url(backend)


@dataclass
class Run:
    proc: subprocess.Popen[str]
    report: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    """Start the suite on every backend at once (mostly waiting: sleeps, spawned processes,
    connect timeouts), so the four take about as long as the slowest one."""
    started: dict[str, Run] = {}
    for backend in BACKENDS:
        tmp = tmp_path_factory.mktemp(f"tooz-{backend}")
        ini = tmp / "pytest.ini"
        ini.write_text("[pytest]\n")  # not Keel's settings: tooz's suite as tooz runs it
        report = tmp / "report.xml"
        env = {**os.environ, "TOOZ_TEST_URL": _url(backend, tmp)}
        command = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(tmp)]
        command += ["-p", "no:cacheprovider", "-q", "--pyargs", "tooz.tests.test_coordination"]
        command += [f"--junitxml={report}"]
        proc = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        started[backend] = Run(proc, report)
    yield started
    for run in started.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.proc.communicate()


@pytest.mark.timeout(480)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tooz_suite_passes_unchanged(backend: str, runs: dict[str, Run]) -> None:
    run = runs[backend]
    output, _ = run.proc.communicate(timeout=450)
    assert run.report.exists(), output[-6000:]
    passed, skipped, failed = [], {}, {}
    for case in ET.parse(run.report).getroot().iter("testcase"):
        name = case.get("name", "")
        outcome = next(iter(case), None)
        if outcome is None or outcome.tag in ("system-out", "system-err"):
            passed.append(name)
        elif outcome.tag == "skipped":
            skipped[name] = outcome.get("message", "")
        else:
            failed[name] = (outcome.get("message") or "")[:500]
    assert not failed, f"tooz's suite failed on keel+{backend}: {failed}\n{output[-4000:]}"
    allowed = ALLOWED_SKIPS | (ALLOWED_SQLITE_SKIPS if backend == "sqlite" else {})
    unexpected = {n: m for n, m in skipped.items() if n not in allowed or allowed[n] not in m}
    assert not unexpected, f"skips count as failures here: {unexpected}"
    assert len(passed) >= 80, (len(passed), output[-2000:])
    assert run.proc.returncode == 0, output[-4000:]
