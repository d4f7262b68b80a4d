"""keel.map against services known to call and notify each other, on every transport."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from keel import errors
from keel import map as kmap
from keel.cli import app
from keel.map import demo
from keel.messaging import RequestContext, RPCClient, RPCServer, Target, _tap, connect
from keel.messaging.spec import export_spec
from tests.conformance.conftest import TRANSPORTS


@pytest.fixture(params=sorted(TRANSPORTS))
async def recorded(request: pytest.FixtureRequest, tmp_path: Path) -> kmap.Graph:
    db = tmp_path / "map.db"
    await demo.run(TRANSPORTS[request.param](), db, rounds=5)
    return kmap.load(db)


def _edges(graph: kmap.Graph) -> set[tuple[str, str, str, str, str]]:
    return {(e.caller, e.caller_method, e.callee, e.pattern, e.method) for e in graph.edges}


async def test_the_map_shows_what_the_services_do(recorded: kmap.Graph) -> None:
    assert _edges(recorded) == {
        ("api", "", "compute", "call", "boot"),
        ("api", "", "compute", "cast", "resize"),
        ("api", "", "image", "call", "list"),
        ("compute", "boot", "image", "call", "get"),
        ("compute", "boot", "network", "call", "allocate"),
        ("network", "allocate", "compute", "call", "get_host"),
        ("network", "allocate", "image", "call", "get"),
        ("compute", "", "billing", "notify", "compute.instance.create.end"),
    }
    boot = next(e for e in recorded.edges if e.method == "boot")
    assert boot.count == 5
    assert boot.p99_ms is not None
    assert boot.p50_ms is not None
    assert recorded.services["image"].versions == {"": "1.2"}
    assert recorded.services["compute"].methods == ["boot", "get_host", "resize"]


async def test_smells_with_evidence(recorded: kmap.Graph) -> None:
    found = {(s.kind, s.summary) for s in kmap.smells(recorded, max_depth=2, fan_in=3)}
    assert found == {
        ("cycle", "synchronous call cycle: compute <-> network"),
        ("deep-chain", "synchronous call chain 3 deep (threshold 2)"),
        ("fan-in", "image is called synchronously by 3 services"),
        ("version-skew", "api calls image.list at 1.0; image offers 1.2"),
    }
    assert kmap.smells(recorded, max_depth=3, fan_in=4) == [
        s
        for s in kmap.smells(recorded, max_depth=3, fan_in=4)
        if s.kind in ("cycle", "version-skew")
    ]


async def test_island_report(recorded: kmap.Graph) -> None:
    compute = {m.method: m for m in kmap.island(recorded, "compute")}
    assert compute["boot"].needs == ["image", "network"]
    assert compute["get_host"].works_alone
    assert compute["resize"].works_alone
    assert all(m.works_alone for m in kmap.island(recorded, "image"))
    network = {m.method: m for m in kmap.island(recorded, "network")}
    assert network["allocate"].needs == ["compute", "image"]


async def test_cli_renders_and_reports(tmp_path: Path) -> None:
    db = tmp_path / "map.db"
    await demo.run("memory://cli-map", db, rounds=3)
    runner = CliRunner()
    dot = runner.invoke(app, ["map", "--db", str(db)])
    assert dot.exit_code == 0, dot.output
    assert '"api" -> "compute"' in dot.output
    svg = tmp_path / "map.svg"
    assert runner.invoke(app, ["map", "--db", str(db), "-f", "svg", "-o", str(svg)]).exit_code == 0
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg"))
    as_json = runner.invoke(app, ["map", "--db", str(db), "-f", "json"])
    assert '"billing"' in as_json.output
    isle = runner.invoke(app, ["island", "compute", "--db", str(db)])
    assert isle.exit_code == 0
    assert "2 of 3 methods (67%)" in isle.output
    assert runner.invoke(app, ["island", "nobody", "--db", str(db)]).exit_code == 2
    assert runner.invoke(app, ["map", "--db", str(tmp_path / "none.db")]).exit_code == 2


async def test_compute_alone_with_fake_neighbours() -> None:
    """compute's boot runs against fakes of image and network built from their specs."""
    transport = await connect("memory://island-test")
    image_spec = export_spec(demo.Image)
    image_spec["methods"]["get"]["examples"] = [
        {"args": {"image_id": "x"}, "result": {"name": "fake-os"}}
    ]
    network_spec = export_spec(demo.Network)
    async with (
        kmap.FakeServer(transport, image_spec, topic="image") as image,
        kmap.FakeServer(
            transport, network_spec, topic="network", responses={"allocate": {"ip": "192.0.2.1"}}
        ),
        RPCServer(transport, Target("compute"), [demo.Compute(transport)]),
    ):
        client = RPCClient(transport, Target("compute"), timeout=5)
        booted = await client.call(None, "boot", name="vm-1", image_id="img-1")
        assert booted == {"instance": "vm-1", "image": "fake-os", "ip": "192.0.2.1"}
        assert image.calls == [("get", {"image_id": "img-1"})]
        fake_image = RPCClient(transport, Target("image"), timeout=5)
        with pytest.raises(errors.InvalidArguments, match="image_id"):
            await fake_image.call(None, "get", image_id=42)
        with pytest.raises(errors.InvalidArguments, match="missing"):
            await fake_image.call(None, "get")
        with pytest.raises(errors.UnknownMethod):
            await fake_image.call(None, "delete", image_id="x")
    await transport.close()


async def test_the_tap_turns_on_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEEL_MAP_DB", str(tmp_path / "env.db"))

    class Echo:
        async def echo(self, ctx: RequestContext, v: int) -> int:
            return v

    transport = await connect("memory://env-tap")
    try:
        assert isinstance(_tap.state.tap, kmap.MapTap)
        async with RPCServer(transport, Target("echo"), [Echo()], service="echo"):
            await RPCClient(transport, Target("echo"), timeout=5, service="tester").call(
                None, "echo", v=1
            )
    finally:
        kmap.disable()
        await transport.close()
    graph = kmap.load(tmp_path / "env.db")
    assert _edges(graph) == {("tester", "", "echo", "call", "echo")}


async def test_edges_are_exported_as_opentelemetry_spans(tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tap = kmap.MapTap(tmp_path / "otel.db", otel=kmap.OtelExport(provider))
    _tap.install(tap)

    class Echo:
        async def echo(self, ctx: RequestContext, v: int) -> int:
            return v

    transport = await connect("memory://otel-tap")
    ctx = RequestContext()
    try:
        async with RPCServer(transport, Target("echo"), [Echo()], service="echo"):
            client = RPCClient(transport, Target("echo"), timeout=5, service="tester")
            await client.call(ctx, "echo", v=1)
            await client.cast(ctx, "echo", v=2)
    finally:
        kmap.disable()
        await transport.close()
    assert [s.name for s in exporter.get_finished_spans()] == ["echo/echo", "echo/echo"]
    for span in exporter.get_finished_spans():
        assert f"{span.context.trace_id:032x}" == ctx.trace_id
        assert span.attributes is not None
        assert span.attributes["keel.caller"] == "tester"
    patterns = sorted(
        str(s.attributes["keel.pattern"]) for s in exporter.get_finished_spans() if s.attributes
    )
    assert patterns == ["call", "cast"]
