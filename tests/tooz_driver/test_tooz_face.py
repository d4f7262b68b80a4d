"""What Keel's tooz driver adds to tooz's own suite, on every backend: the fence, mixed fleets
of tooz and native Keel code, leases that a live holder keeps without heartbeat(), a dead
member leaving (the safety half of tooz's skipped test_timeout), a broken holder told so, and
CHARACTERISTICS that match the Keel backend's."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import keel.coordination.sync as ksync
from coord_support import BACKENDS
from keel.coordination import FencedRegister
from keel.errors import StaleFence
from tests.servers import server_url

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # eventlet's deprecation notice, imported by tooz's deps
    import tooz
    from tooz import coordination

pytestmark = pytest.mark.timeout(90)
TTL = 2


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A Keel backend as tooz names it, with a short lease (tooz's ``timeout`` option)."""
    if request.param == "sqlite":
        return f"keel+sqlite://{tmp_path}/tooz.db?timeout={TTL}"
    return f"keel+{server_url(request.param)}?timeout={TTL}"


@pytest.fixture
def coordinators(url: str) -> Iterator[list[coordination.CoordinationDriver]]:
    started: list[coordination.CoordinationDriver] = []
    yield started
    for coord in started:
        if coord.is_started:
            coord.stop()


def _start(
    url: str, started: list[coordination.CoordinationDriver], member: bytes | None = None
) -> coordination.CoordinationDriver:
    coord = coordination.get_coordinator(url, member or uuid.uuid4().hex.encode())
    coord.start()
    started.append(coord)
    return coord


def _tooz_process(url: str, member: bytes, statement: str) -> subprocess.Popen[str]:
    """A tooz service in a process of its own (to be SIGKILLed): a coordinator as ``member``
    that has run ``statement``."""
    script = textwrap.dedent(
        f"""
        import time, warnings
        warnings.simplefilter("ignore")
        from tooz import coordination
        coord = coordination.get_coordinator({url!r}, {member!r})
        coord.start()
        {statement}
        print("READY", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.communicate()
        pytest.fail(f"the tooz process did not get ready: {line!r}")
    return proc


def _name() -> bytes:
    return uuid.uuid4().hex.encode()


def test_fence_is_exposed_and_grows_across_holders(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    a, b = _start(url, coordinators), _start(url, coordinators)
    name = _name()
    lock_a, lock_b = a.get_lock(name), b.get_lock(name)
    assert lock_a.fence is None
    fences = []
    for lock in (lock_a, lock_b, lock_a):
        with lock:
            assert isinstance(lock.fence, int)
            fences.append(lock.fence)
        assert lock.fence is None
    assert fences == sorted(set(fences)), fences


def test_tooz_and_native_keel_code_share_one_lock(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    """A cloud can move services to Keel one at a time: tooz's name is Keel's name."""
    coord = _start(url, coordinators)
    name = _name()
    native = ksync.connect(url.removeprefix("keel+").split("?")[0], member_id="native", ttl=TTL)
    try:
        lock = coord.get_lock(name)
        assert lock.acquire(blocking=False)
        assert native.try_acquire(name.decode()) is None
        fence = lock.fence
        assert lock.release()
        held = native.acquire(name.decode(), timeout=5)
        assert fence is not None
        assert held.fence > fence
        assert not lock.acquire(blocking=False)
        held.release()
        assert lock.acquire(blocking=1.0)
        assert lock.release()
    finally:
        native.close()


def test_a_live_holder_keeps_its_lock_without_heartbeat(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    """tooz's redis driver lets a lock expire under a holder that does not heartbeat; Keel
    renews it in the background for as long as the holder lives."""
    a, b = _start(url, coordinators), _start(url, coordinators)
    name = _name()
    lock = a.get_lock(name)
    assert lock.acquire()
    time.sleep(TTL * 1.5)
    assert not b.get_lock(name).acquire(blocking=False)
    assert lock.is_still_owner()
    assert lock.release()


def test_a_broken_holder_is_told_and_its_fenced_writes_refused(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    a, b = _start(url, coordinators), _start(url, coordinators)
    name = _name()
    register = FencedRegister()
    old, new = a.get_lock(name), b.get_lock(name)
    assert old.acquire()
    assert old.fence is not None
    register.write("volume", old.fence, "old holder")
    assert new.break_()
    assert not old.is_still_owner()
    assert new.acquire(blocking=False)
    assert new.fence is not None
    register.write("volume", new.fence, "new holder")
    with pytest.raises(StaleFence):
        register.write("volume", old.fence, "stale write")
    assert not old.release()
    assert new.release()


def test_a_dead_member_leaves_and_watchers_see_it(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    watcher = _start(url, coordinators)
    group = _name()
    watcher.create_group(group).get()
    proc = _tooz_process(url, b"doomed", f"coord.join_group({group!r}, {{'role': 'w'}}).get()")
    try:
        left: list[coordination.MemberLeftGroup] = []
        watcher.watch_leave_group(group, left.append)
        watcher.run_watchers()
        assert watcher.get_member_capabilities(group, b"doomed").get() == {"role": "w"}
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + TTL + 3
    while not left:
        assert time.monotonic() < deadline, "a dead member was still listed after ttl + 3 s"
        watcher.run_watchers()
        time.sleep(0.05)
    assert [e.member_id for e in left] == [b"doomed"]
    assert b"doomed" not in watcher.get_members(group).get()


def test_leadership_moves_when_the_leader_dies_with_its_process(
    url: str, coordinators: list[coordination.CoordinationDriver]
) -> None:
    group = _name()
    follower = _start(url, coordinators)
    follower.create_group(group).get()
    campaign = f"coord.watch_elected_as_leader({group!r}, lambda e: None); coord.run_watchers()"
    proc = _tooz_process(url, b"leader", campaign + f"; assert coord.leader_term({group!r})")
    elected: list[coordination.LeaderElected] = []
    try:
        follower.watch_elected_as_leader(group, elected.append)
        follower.run_watchers()
        assert not elected
        assert follower.leader_term(group) is None
        assert follower.get_leader(group).get() == b"leader"
    finally:
        proc.kill()
        proc.communicate()
    deadline = time.monotonic() + TTL + 3
    while not elected:
        assert time.monotonic() < deadline, "leadership did not move within ttl + 3 s"
        follower.run_watchers()
        time.sleep(0.05)
    assert follower.get_leader(group).get() == follower._member_id
    term = follower.leader_term(group)
    assert isinstance(term.fence, int)


def test_characteristics_match_the_keel_backend(url: str) -> None:
    coord = coordination.get_coordinator(url, b"x")
    declared = set(coord.CHARACTERISTICS)
    c = coordination.Characteristics
    assert {c.DISTRIBUTED_ACROSS_THREADS, c.DISTRIBUTED_ACROSS_PROCESSES} <= declared
    assert (c.DISTRIBUTED_ACROSS_HOSTS in declared) == (not url.startswith("keel+sqlite"))
    assert len(declared & {c.LINEARIZABLE, c.SEQUENTIAL, c.CAUSAL}) >= 1
    with pytest.raises(coordination.ToozDriverChosenPoorly):
        coordination.get_coordinator(url, b"x", characteristics=[*c])  # none has all


@pytest.mark.parametrize("timeout", ["abc", "-1", "0", "nan", "inf", "1e999"])
def test_a_bad_timeout_is_a_tooz_error(tmp_path: Path, timeout: str) -> None:
    with pytest.raises(tooz.ToozError, match="timeout"):
        coordination.get_coordinator(f"keel+sqlite://{tmp_path}/x.db?timeout={timeout}", b"x")


def test_bad_names_and_urls_are_tooz_errors(tmp_path: Path) -> None:
    with pytest.raises(tooz.ToozError):
        coordination.get_coordinator(f"keel+sqlite://{tmp_path}/x.db", b"\xff").start()
    coord = coordination.get_coordinator("keel+redis://127.0.0.1:1/not-a-db", b"x")
    with pytest.raises(coordination.ToozConnectionError):
        coord.start()
