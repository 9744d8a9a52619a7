"""`fusionrec k8s ...`: render and validate the KubeRay manifests in k8s/, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import friendly_errors

app = typer.Typer(help="Kubernetes (KubeRay): render and validate the manifests in k8s/, offline.",
                      no_args_is_help=True)
K8sFolder = Annotated[Path, typer.Argument(help="Manifest folder (base, overlays, Dockerfile).")]
ServeConfig = Annotated[Path, typer.Option(help="The Serve config that the RayService serves.")]


@app.command("render")
@friendly_errors
def k8s_render(folder: K8sFolder = Path("k8s"), serve_config: ServeConfig = Path("serve/config.yaml")) -> None:
    """Write the RayService's serveConfigV2 from the Serve config, so Kubernetes serves what `fusionrec serve` does."""
    from fusionrec.ops.k8s import render

    for path in render(folder, serve_config):
        typer.echo(f"rendered {path}: spec.serveConfigV2 from {serve_config}")


@app.command("validate")
@friendly_errors
def k8s_validate(folder: K8sFolder = Path("k8s"), serve_config: ServeConfig = Path("serve/config.yaml")) -> None:
    """Check every manifest and overlay offline; print each problem as FILE: KIND/NAME: path.to.field: message."""
    from fusionrec.ops.k8s import validate

    report = validate(folder, serve_config)
    if report.problems:
        for problem in report.problems:
            typer.echo(str(problem))
        count = len(report.problems)
        typer.echo(f"{folder}: invalid, {count} problem{'s' if count != 1 else ''}", err=True)
        raise SystemExit(1)  # not typer.Exit: a RuntimeError, which friendly_errors would report once more
    typer.echo(report.summary(folder, serve_config))
