"""What every command module shares: the one-line error contract (`friendly_errors`, `fail`,
`at_least`) and the model-cache option."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from fusionrec.config import state_folder
from fusionrec.data.problems import DataError

CacheOption = Annotated[Path | None, typer.Option(help="Model cache (default: $FUSIONREC_HOME/models).")]


def default_cache(cache: Path | None) -> Path:
    return cache or state_folder() / "models"


def fail(message: str, details: Sequence[str] = ()) -> None:
    """One line; `details` (a failed process's command and log tail) indented under it."""
    typer.echo(f"error: {message}", err=True)
    for line in details:
        typer.echo(f"  {line}", err=True)
    raise typer.Exit(1)


def at_least(minimum: int) -> Callable[[typer.CallbackParam, int], int]:
    """An option's lower bound, checked as bad input (exit 1, with a message saying what the least
    is); typer's own `min=` would answer as a usage mistake, exit 2."""

    def check(param: typer.CallbackParam, value: int) -> int:
        if value < minimum:
            fail(f"{param.opts[0]} must be at least {minimum}, got {value}")
        return value

    return check


def friendly_errors(command: Callable) -> Callable:
    """Report expected failures (bad data, bad arguments, existing output) as one line each, no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise  # a command's own exit code (typer.Exit is a RuntimeError)
        except DataError as exc:
            for problem in exc.problems:
                typer.echo(str(problem), err=True)
            raise typer.Exit(1) from None
        except (ValueError, FileExistsError, OSError, RuntimeError) as exc:
            fail(_first_line(exc), getattr(exc, "details", ()))  # details: processes.StartFailed
        except Exception as exc:
            if not _from_mlflow_or_ray(exc):
                raise  # a bug: its traceback is what a report needs
            fail(_first_line(exc))

    return wrapper


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _from_mlflow_or_ray(exc: Exception) -> bool:
    """An MLflow or Ray error (no registry, no cluster, a failed task). Their classes are looked up
    only among loaded modules: an error from one means it is loaded, and importing Ray just to
    check would slow every command down."""
    kinds = (getattr(sys.modules.get(module), name, None)
             for module, name in (("mlflow.exceptions", "MlflowException"), ("ray.exceptions", "RayError")))
    return any(kind is not None and isinstance(exc, kind) for kind in kinds)
