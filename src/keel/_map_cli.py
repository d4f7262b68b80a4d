"""`keel map` and `keel island`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keel import urls
from keel.errors import ConfigError

app = typer.Typer(
    help="Render the service map recorded from live traffic, and what it smells of.",
    rich_markup_mode=None,
)
DB = Annotated[
    Path | None, typer.Option("--db", help="map database (default $KEEL_MAP_DB or .keel/map.db)")
]


def _db(db: Path | None) -> Path:
    path = db or Path(urls.from_env("map_db", ".keel/map.db"))
    if not path.exists():
        raise typer.BadParameter(
            f"no map database at {path}: run services with KEEL_MAP_DB={path} (or `keel map demo`)"
        )
    return path


@app.callback(invoke_without_command=True)
def show(  # noqa: PLR0917 - typer maps each option to a parameter
    ctx: typer.Context,
    db: DB = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="json, dot, svg or png")] = "dot",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write here, not stdout")
    ] = None,
    max_depth: Annotated[int, typer.Option(help="report synchronous chains deeper than this")] = 3,
    fan_in: Annotated[
        int, typer.Option(help="report services called synchronously by this many")
    ] = 3,
) -> None:
    """Render the map and list its smells (cycles, deep chains, fan-in hotspots, version skew)."""
    if ctx.invoked_subcommand is not None:
        return
    from keel import map as kmap  # noqa: PLC0415 - keep `keel --help` fast

    graph = kmap.load(_db(db))
    try:
        if fmt == "json":
            data = kmap.to_json(graph).encode()
        elif fmt == "dot":
            data = kmap.to_dot(graph).encode()
        else:
            data = kmap.to_image(graph, fmt)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if output is None:
        typer.echo(
            data.decode() if fmt in ("json", "dot") else f"{len(data)} bytes of {fmt}; use -o FILE"
        )
    else:
        output.write_bytes(data)
    console = Console(stderr=True)
    found = kmap.smells(graph, max_depth=max_depth, fan_in=fan_in)
    if found:
        table = Table(title=f"{len(found)} smells")
        for column in ("kind", "what", "evidence"):
            table.add_column(column)
        for smell in found:
            table.add_row(smell.kind, smell.summary, "\n".join(smell.evidence))
        console.print(table)
    else:
        console.print("no smells")


@app.command()
def demo(
    db: DB = None,
    url: Annotated[str, typer.Option(help="transport URL")] = "memory://map-demo",
    rounds: Annotated[int, typer.Option(help="API requests to make")] = 20,
) -> None:
    """Run demo services that call and notify each other, recording their map."""
    from keel.map import demo as map_demo  # noqa: PLC0415

    path = db or Path(urls.from_env("map_db", ".keel/map.db"))
    asyncio.run(map_demo.run(url, path, rounds))
    typer.echo(f"recorded the demo's traffic in {path}; now: keel map --db {path}")


def island(
    service: Annotated[str, typer.Argument(help="the service to isolate")],
    db: DB = None,
) -> None:
    """Which of SERVICE's methods still work if every other service is down."""
    from keel import map as kmap  # noqa: PLC0415

    graph = kmap.load(_db(db))
    if service not in graph.services:
        known = ", ".join(sorted(s for s in graph.services if not s.startswith("?")))
        raise typer.BadParameter(f"no service {service!r} in the map; known: {known}")
    methods = kmap.island(graph, service)
    table = Table(title=f"{service} on its own island")
    for column in ("method", "works alone", "needs (synchronously)", "async only"):
        table.add_column(column)
    for m in methods:
        table.add_row(
            m.method, "yes" if m.works_alone else "no", ", ".join(m.needs), ", ".join(m.async_deps)
        )
    console = Console()
    console.print(table)
    working = sum(m.works_alone for m in methods)
    share = working / len(methods) if methods else 0.0
    console.print(
        f"{working} of {len(methods)} methods ({share:.0%}) work with every other service down"
    )
