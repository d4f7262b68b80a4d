"""The `keel` command."""

from __future__ import annotations

import typer

import keel
from keel.agent._cli import app as agent_app

app = typer.Typer(
    help="Keel: messaging, drain, coordination, events and guest agents for control planes.",
    no_args_is_help=True,
    add_completion=False,
)

app.add_typer(agent_app, name="agent")


@app.callback()
def _root() -> None:
    """Keel: messaging, drain, coordination, events and guest agents for control planes."""


@app.command()
def version() -> None:
    """Print Keel's version."""
    typer.echo(keel.__version__)


def main() -> None:
    app()
