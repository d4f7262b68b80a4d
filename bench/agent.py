"""Keel's agent beside qemu-guest-agent, in one run: both on unix sockets on this machine, or
with ``--vm`` both in one real guest (scripts/servers.d/vm.sh) over virtio-serial, driven
through QEMU's chardev sockets as a cloud's controller drives them.

Measures ping p50/p99, an exec of /bin/true (start to exit status, as each agent's client
sees it) and a 32 MiB file written and read back. Prints a table and, last, a RESULT line
with Keel's figures as ratios of qemu-ga's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import _servers
from keel.agent import AgentClient

MiB = 1024 * 1024


def _wait_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(200):
        if path.exists():
            return
        if proc.poll() is not None:
            raise SystemExit(f"agent exited early with status {proc.returncode}")
        time.sleep(0.05)
    raise SystemExit(f"no socket at {path} after 10s")


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True)


class _Samples:
    def __init__(self) -> None:
        self.ping: list[float] = []
        self.exec: list[float] = []
        self.put: list[float] = []
        self.get: list[float] = []


async def _round(
    client: AgentClient, work: Path, out: _Samples, *, pings: int, execs: int, data: bytes
) -> None:
    """One round of every measure. Rounds alternate between the two agents, so drift in
    the machine's load (other processes, CPU frequency) falls on both alike."""
    for _ in range(pings):
        t = time.perf_counter()
        await client.ping()
        out.ping.append(time.perf_counter() - t)
    for _ in range(execs):
        t = time.perf_counter()
        result = await client.exec(["/bin/true"])
        out.exec.append(time.perf_counter() - t)
        assert result.exit_code == 0
    target = str(work / f"{client.kind}.bin")
    t = time.perf_counter()
    await client.put_file(target, data)
    out.put.append(time.perf_counter() - t)
    t = time.perf_counter()
    got = await client.get_file(target)
    out.get.append(time.perf_counter() - t)
    assert got == data, "file came back different"


def _summary(s: _Samples, size: int) -> dict[str, float]:
    ping = sorted(s.ping)
    return {
        "ping_p50_us": ping[len(ping) // 2] * 1e6,
        "ping_p99_us": ping[int(len(ping) * 0.99)] * 1e6,
        "exec_ms": statistics.median(s.exec) * 1e3,
        "put_mibs": size / MiB / statistics.median(s.put),
        "get_mibs": size / MiB / statistics.median(s.get),
    }


async def _measure(
    keel_url: str, qga_url: str, work: Path, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float]]:
    """Keel's and qemu-ga's figures, measured in alternating rounds."""
    size = args.size_mib * MiB
    data = os.urandom(size)
    qs, ks = _Samples(), _Samples()
    async with (
        await AgentClient.connect(qga_url, timeout=args.timeout) as qga,
        await AgentClient.connect(keel_url, timeout=args.timeout) as kc,
    ):
        for client in (qga, kc):  # warm up
            for _ in range(args.warmup):
                await client.ping()
        pings, execs = args.pings // args.rounds, args.execs // args.rounds
        for _ in range(args.rounds):
            await _round(qga, work, qs, pings=pings, execs=execs, data=data)
            await _round(kc, work, ks, pings=pings, execs=execs, data=data)
    return _summary(ks, size), _summary(qs, size)


async def _run_vm(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float], str]:
    keel_url, qga_url = _servers.url("vm").split()
    accel = Path(_servers.url_dir("vm")) / "accel"
    how = accel.read_text().split()[0] if accel.exists() else "?"
    k, q = await _measure(keel_url, qga_url, Path("/tmp"), args)
    return k, q, f"in one guest over virtio-serial ({how})"


async def _run(args: argparse.Namespace) -> None:
    if args.vm:
        k, q, where = await _run_vm(args)
    else:
        k, q = await _run_local(args)
        where = "on unix sockets"
    _report(k, q, where, args)


async def _run_local(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    qga_bin = shutil.which("qemu-ga", path=os.environ.get("PATH", "") + ":/usr/sbin")
    if qga_bin is None:
        raise SystemExit("qemu-ga is not installed: scripts/servers install qemu-ga")
    with tempfile.TemporaryDirectory(prefix="keel-bench-agent-") as tmp:
        work = Path(tmp)
        keel_sock, qga_sock = work / "keel.sock", work / "qga.sock"
        keel_proc = _start(
            [sys.executable, "-m", "keel", "agent", "run", "--listen", f"unix://{keel_sock}"]
        )
        qga_proc = _start(
            [qga_bin, "-m", "unix-listen", "-p", str(qga_sock), "-t", tmp, "-f", f"{tmp}/qga.pid"]
        )
        try:
            _wait_socket(keel_sock, keel_proc)
            _wait_socket(qga_sock, qga_proc)
            return await _measure(f"unix://{keel_sock}", f"qga+unix://{qga_sock}", work, args)
        finally:
            for proc in (keel_proc, qga_proc):
                with_signal(proc)


def _report(k: dict[str, float], q: dict[str, float], where: str, args: argparse.Namespace) -> None:
    table = Table(
        title=f"agent: Keel vs qemu-ga {where} ({args.size_mib} MiB file, "
        f"{args.rounds} alternating rounds)"
    )
    table.add_column("measure")
    table.add_column("keel", justify="right")
    table.add_column("qemu-ga", justify="right")
    table.add_column("ratio", justify="right")
    rows = [
        ("ping p50 (us)", "ping_p50_us"),
        ("ping p99 (us)", "ping_p99_us"),
        ("exec /bin/true (ms)", "exec_ms"),
        ("file put (MiB/s)", "put_mibs"),
        ("file get (MiB/s)", "get_mibs"),
    ]
    for label, key in rows:
        table.add_row(label, f"{k[key]:.1f}", f"{q[key]:.1f}", f"{k[key] / q[key]:.2f}")
    Console().print(table)
    ratios = {
        "ratio_ping_p50_vs_qga": k["ping_p50_us"] / q["ping_p50_us"],
        "ratio_ping_p99_vs_qga": k["ping_p99_us"] / q["ping_p99_us"],
        "ratio_exec_vs_qga": k["exec_ms"] / q["exec_ms"],
        "ratio_put_vs_qga": k["put_mibs"] / q["put_mibs"],
        "ratio_get_vs_qga": k["get_mibs"] / q["get_mibs"],
    }
    fields = " ".join(f"{key}={value:.3f}" for key, value in ratios.items())
    raw = " ".join(f"keel_{key}={value:.1f} qga_{key}={q[key]:.1f}" for key, value in k.items())
    name = "agent_vm" if args.vm else "agent"
    print(f"RESULT name={name} {fields} {raw}")


def with_signal(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench agent")
    parser.add_argument("--vm", action="store_true", help="both agents in a real guest")
    parser.add_argument("--pings", type=int, help="default 2000 (200 with --vm)")
    parser.add_argument("--execs", type=int, help="default 100 (10 with --vm)")
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--rounds", type=int, help="default 5 (2 with --vm)")
    args = parser.parse_args(argv)
    # A guest under TCG is slow: fewer samples, longer deadlines.
    for name, local, vm in (("pings", 2000, 200), ("execs", 100, 10), ("rounds", 5, 2)):
        if getattr(args, name) is None:
            setattr(args, name, vm if args.vm else local)
    args.warmup = 20 if args.vm else 200
    args.timeout = 900 if args.vm else 120
    asyncio.run(_run(args))
