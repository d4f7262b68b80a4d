"""Every `--help` reads well in an 80-column terminal: no `<bool>` metavar on flags, no word
or option name cut short with an ellipsis."""

from __future__ import annotations

import click
import typer
from typer.testing import CliRunner

from keel.cli import app


def _commands() -> list[list[str]]:
    root = typer.main.get_command(app)
    found: list[list[str]] = [[]]

    def walk(command: click.Command, path: list[str]) -> None:
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                found.append([*path, name])
                walk(sub, [*path, name])

    walk(root, [])
    return found


def test_no_bool_metavar_and_nothing_cut_at_80_columns() -> None:
    runner = CliRunner()
    for path in _commands():
        result = runner.invoke(app, [*path, "--help"], terminal_width=80, env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, path
        assert "…" not in result.output, (path, result.output)
        assert max(len(line) for line in result.output.splitlines()) <= 80, path


def test_hub_serve_help_names_every_option_in_full() -> None:
    result = CliRunner().invoke(
        app, ["hub", "serve", "--help"], terminal_width=80, env={"COLUMNS": "80"}
    )
    text = " ".join(result.output.split())
    for word in ("--keystone-project", "KEEL_KEYSTONE_PASSWORD", "--tls-cert", "--tls-key"):
        assert word in text, word
