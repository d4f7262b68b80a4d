"""`keel up`: the hub and its dashboard on embedded defaults, with a demo compute service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def up(
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1 (0 picks a free one).")] = 8780,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    data: Annotated[
        Path | None, typer.Option(help="Directory for the SQLite store (default: a temp dir).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between demo lifecycle events.")] = 1.0,
) -> None:
    """Run the hub, its dashboard and a demo compute service for two tenants (Ctrl-C stops)."""
    try:
        from keel.hub import _up  # noqa: PLC0415 - keep `keel --help` fast; needs keel[hub]
    except ImportError as exc:
        typer.echo(f"keel up needs the hub extra: pip install 'keel[hub]' ({exc})", err=True)
        raise typer.Exit(2) from None
    _up.main(host=host, port=port, data_dir=data, interval=interval)
