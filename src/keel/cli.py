"""The `keel` command."""

from __future__ import annotations

import typer

import keel

app = typer.Typer(
    help="Keel: messaging, drain, coordination, events and guest agents for control planes.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keel: messaging, drain, coordination, events and guest agents for control planes."""


@app.command()
def version() -> None:
    """Print Keel's version."""
    typer.echo(keel.__version__)


@app.command()
def demo() -> None:
    """Run call, cast, fanout and notifications on the embedded memory:// transport."""
    from keel import _demo  # noqa: PLC0415 - keep `keel --help` fast

    _demo.main()


def main() -> None:
    app()
