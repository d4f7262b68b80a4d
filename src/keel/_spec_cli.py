"""`keel spec export` and `keel spec diff`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from keel.errors import ConfigError
from keel.messaging.spec import diff_specs, export_spec, load

app = typer.Typer(
    help="Export an RPC interface spec, or list the breaking changes between two.",
    rich_markup_mode=None,
)
STYLE = {"breaking": "bold red", "needs-minor": "yellow", "wrong": "bold red", "allowed": "green"}


@app.command("export")
def export(
    ref: Annotated[
        str, typer.Argument(help="MODULE:Class of the endpoint, e.g. nova.compute.rpc:ComputeAPI")
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="write here instead of stdout")
    ] = None,
) -> None:
    """Write an endpoint's RPC interface (methods, parameter types, versions) as JSON."""
    try:
        spec = export_spec(load(ref))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    text = json.dumps(spec, indent=2, sort_keys=True)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")


@app.command("diff")
def diff(old: Path, new: Path) -> None:
    """List the changes from OLD to NEW that break callers; exit 1 if there are any."""
    try:
        result = diff_specs(json.loads(old.read_text()), json.loads(new.read_text()))
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read spec: {exc}") from None
    console = Console()
    if not result.changes:
        console.print(f"{result.old_version} -> {result.new_version}: no interface changes")
        return
    table = Table(title=f"interface {result.old_version} -> {result.new_version}")
    for column in ("kind", "where", "what"):
        table.add_column(column)
    for change in result.changes:
        table.add_row(f"[{STYLE[change.kind]}]{change.kind}[/]", change.where, change.what)
    console.print(table)
    if result.failed:
        console.print("[bold red]breaking changes: bump the major version or keep compatibility[/]")
        raise typer.Exit(1)
