from typer.testing import CliRunner

import keel
from keel.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert keel.__version__ in result.output


def test_demo_shows_every_pattern() -> None:
    result = CliRunner().invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    for word in ("call", "cast", "fanout", "notify", "NotFound", "CallTimeout"):
        assert word in result.output
    assert "8 notifications" in result.output
