"""oslo.messaging's side of `python -m bench upgrade`: the same scenario on RabbitMQ.

Three oslo.messaging RPC servers (threading executor) under calls and casts from client
threads are replaced one by one the way OpenStack services are restarted today: stop(),
wait(), start a new one of the next version under the same server name. The same code runs
twice in one run: on oslo's own rabbit driver (``rabbit://``) and on Keel's driver
(``keel+rabbit://``), whose stop() is Keel's drain.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

from bench import _servers as servers
from bench._upgrade import upgrade_figures


def run(clients: int, settle: float, *, keel: bool = False) -> dict[str, Any]:
    """The scenario on ``rabbit://`` (oslo's driver) or, with ``keel``, ``keel+rabbit://``."""
    import oslo_messaging as om  # noqa: PLC0415 - only when the anchor runs
    from oslo_config import cfg  # noqa: PLC0415

    conf = cfg.CONF  # oslo registers some options (tracing) on the global CONF only
    conf([], project="bench")
    url = servers.url("rabbit")
    transport = om.get_rpc_transport(conf, url=f"keel+{url}" if keel else url)
    topic = f"oslo-upgrade-{'keel-' if keel else ''}{time.monotonic_ns()}"
    executed: Counter[str] = Counter()
    lock = threading.Lock()

    class V10:
        target = om.Target(version="1.0")

        def get(self, ctxt: Any, key: str) -> str:
            time.sleep(0.002)
            return key

        def put(self, ctxt: Any, key: str) -> None:
            time.sleep(0.002)
            with lock:
                executed[key] += 1

    class V11(V10):
        target = om.Target(version="1.1")

    def launch(cls: type[V10], name: str) -> Any:
        server = om.get_rpc_server(
            transport, om.Target(topic=topic, server=name), [cls()], executor="threading"
        )
        server.start()
        return server

    running = [launch(V10, f"s{i}") for i in range(3)]
    window: dict[str, float] = {}
    latencies: list[tuple[float, float]] = []
    failed: list[str] = []
    sent: list[str] = []
    stop = threading.Event()

    def load(n: int) -> None:
        client = om.get_rpc_client(transport, om.Target(topic=topic), timeout=10)
        for i in range(1_000_000):  # bounded; stopped by the scenario
            if stop.is_set():
                return
            key = f"c{n}-{i}"
            began = time.perf_counter()
            try:
                client.call({}, "get", key=key)
                latencies.append((began, time.perf_counter() - began))
                client.cast({}, "put", key=key)
                sent.append(key)
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
            time.sleep(random.uniform(0, 0.01))

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(settle)
    replacements = []
    window["start"] = time.perf_counter()
    for i in range(3):
        began = time.perf_counter()
        running[i].stop()
        running[i].wait()
        running[i] = launch(V11, f"s{i}")
        replacements.append(time.perf_counter() - began)
        time.sleep(0.5)
    window["end"] = time.perf_counter()
    time.sleep(settle)
    stop.set()
    for thread in threads:
        thread.join(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(executed[k] == 0 for k in sent):
        time.sleep(0.1)
    for server in running:
        server.stop()
        server.wait()
    transport.cleanup()
    return upgrade_figures(
        latencies, failed, sent=sent, executed=executed, window=window, replacements=replacements
    )
