"""The `fusionrec` command: every command and group, registered here in the order `--help` lists
them. Each lives in the module of its stage; each parses flags, calls one function, and turns bad
input into a one-line error and exit code 1 (cli.base.friendly_errors)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer._click import exceptions as usage  # typer 0.29 carries its own click; no public name for these

from fusionrec import __version__
from fusionrec.cli import cluster, data, evaluation, k8s, models, search, serving, training
from fusionrec.verbosity import configure as configure_output

app = typer.Typer(help="fusionrec: multimodal recommendations on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusionrec {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show what Ray, MLflow and transformers print "
                                                            "(notices, logs, warnings, their progress bars).")]
    = False,
) -> None:
    """fusionrec: multimodal recommendations on Ray."""
    configure_output(verbose)


app.command("metrics")(evaluation.metrics)
app.command("encode")(models.encode)
app.command("train")(training.train)
app.command("runs")(evaluation.runs)
app.command("evaluate")(evaluation.evaluate)
app.command("serve")(serving.serve)
app.command("promote")(training.promote)
app.command("tune")(search.tune)
app.command("ablate")(search.ablate)
app.add_typer(data.app, name="data")
app.add_typer(models.app, name="models")
app.add_typer(cluster.cluster_app, name="cluster")
app.add_typer(cluster.job_app, name="job")
app.add_typer(k8s.app, name="k8s")


def run(args: list[str] | None = None) -> None:
    """The `fusionrec` console script (and the jobs' entry, given `args`): `app`, with a usage
    mistake (an unknown command or option, a value of the wrong type, a missing argument) told in
    one line and exit 2, as any other bad input is, where click would draw its usage box."""
    try:
        code = typer.main.get_command(app).main(args, prog_name="fusionrec", standalone_mode=False)
    except usage.NoArgsIsHelpError as exc:  # `fusionrec` or a group alone: typer has printed its help
        sys.exit(exc.exit_code)
    except usage.UsageError as exc:
        see = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        typer.echo(f"error: {exc.format_message()}{see}", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C where a command does not handle it (click's own exit code)
        typer.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
