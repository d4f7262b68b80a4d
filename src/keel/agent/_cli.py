"""``keel agent run``: the agent process (`keel.agent._daemon`) behind Keel's CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from keel.agent._daemon import HELP, run_agent

app = typer.Typer(
    help="The Keel guest agent.", no_args_is_help=True, add_completion=False, rich_markup_mode=None
)


@app.command()
def run(
    *,
    listen: Annotated[str | None, typer.Option(help=HELP["listen"])] = None,
    connect: Annotated[str | None, typer.Option(help=HELP["connect"])] = None,
    config: Annotated[Path | None, typer.Option(help=HELP["config"])] = None,
    instance_id: Annotated[str | None, typer.Option(help=HELP["instance_id"])] = None,
    cert: Annotated[Path | None, typer.Option(help=HELP["cert"])] = None,
    key: Annotated[Path | None, typer.Option(help=HELP["key"])] = None,
    ca: Annotated[Path | None, typer.Option(help=HELP["ca"])] = None,
) -> None:
    """Run the guest agent on one channel until SIGTERM."""
    status = run_agent(
        listen=listen,
        connect=connect,
        config=config,
        instance_id=instance_id,
        cert=cert,
        key=key,
        ca=ca,
    )
    if status:
        raise typer.Exit(status)


@app.callback()
def _group() -> None:
    """The Keel guest agent."""
