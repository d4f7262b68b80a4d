from typer.testing import CliRunner

import keel
from keel.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert keel.__version__ in result.output
