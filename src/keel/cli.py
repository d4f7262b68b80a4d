"""The `keel` command."""

from __future__ import annotations

import typer

import keel
from keel._hub_cli import hub_app, up
from keel._map_cli import app as map_app
from keel._map_cli import island
from keel._spec_cli import app as spec_app
from keel.agent._cli import app as agent_app

app = typer.Typer(
    help="Keel: messaging, drain, coordination, events and guest agents for control planes.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # click's help wraps words at the terminal width; rich's cut them
    pretty_exceptions_show_locals=False,  # locals hold URLs with their passwords
)

app.add_typer(agent_app, name="agent")


app.add_typer(spec_app, name="spec")
app.add_typer(map_app, name="map")
app.command("island")(island)
app.command("up")(up)
app.add_typer(hub_app, name="hub")


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
