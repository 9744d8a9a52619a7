"""Every command answers --help."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fusionrec.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["data"], ["data", "validate"], ["data", "synth"],
                                     ["data", "movielens-100k"], ["metrics"], ["models"],
                                     ["models", "prepare"], ["models", "list"], ["encode"], ["train"],
                                     ["evaluate"]])
def test_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_version():
    assert runner.invoke(app, ["--version"]).stdout.startswith("fusionrec ")


def test_models_list():
    out = runner.invoke(app, ["models", "list"]).stdout
    assert all(name in out for name in ("fusion", "neumf", "svd", "dnn", "no_structured"))
