"""`fusionrec data ...`: validate a dataset folder, synthesise the shop, convert MovieLens-100K."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import friendly_errors

app = typer.Typer(help="Datasets: validate, synthesise, convert.", no_args_is_help=True)


@app.command("validate")
@friendly_errors
def data_validate(
    folder: Annotated[Path, typer.Argument(help="Dataset folder holding dataset.yaml and the tables.")],
    images: Annotated[bool, typer.Option(help="Open and decode every image (--no-images skips it).")] = True,
) -> None:
    """Check a dataset folder against the contract; print every problem as FILE:ROW:COLUMN: message."""
    from fusionrec.data.validate import validate

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: dataset folder not found")
    dataset, problems = validate(folder, check_images=images)
    if problems:
        for problem in problems:
            typer.echo(str(problem))
        typer.echo(f"{folder}: invalid, {len(problems)} problem{'s' if len(problems) != 1 else ''}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok {dataset.summary()} ({folder})")


@app.command("synth")
@friendly_errors
def data_synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the dataset to.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 500,
    items: Annotated[int, typer.Option(help="Number of items.")] = 300,
    density: Annotated[float, typer.Option(help="Fraction of user-item pairs that are rated.")] = 0.05,
    seed: Annotated[int, typer.Option(help="Random seed: the same arguments give byte-identical files.")] = 0,
    image_size: Annotated[int, typer.Option(help="Side of the rendered images in pixels.")] = 128,
    images: Annotated[bool, typer.Option(help="Render images (--no-images leaves image columns empty).")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Generate the synthetic dress shop, with its hidden truth recorded in dataset.yaml."""
    import time

    from fusionrec.data.synth import SynthConfig, generate

    start = time.perf_counter()
    config = SynthConfig(users=users, items=items, density=density, seed=seed, image_size=image_size, images=images)
    spec = generate(config, out, overwrite=overwrite)
    typer.echo(
        f"wrote {out}: {users:,} users, {items:,} items, {config.n_ratings:,} ratings in "
        f"{time.perf_counter() - start:.1f}s; Bayes floor (best possible test MSE) {spec.truth['bayes_mse']:.4f}"
    )


@app.command("movielens-100k")
@friendly_errors
def data_movielens(
    out: Annotated[Path, typer.Argument(help="Folder to write the converted dataset to.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert the MovieLens-100K copy shipped by recbole==1.2.1 into a dataset folder."""
    from fusionrec.data.movielens import convert

    convert(out, overwrite=overwrite)
    typer.echo(f"wrote {out}: MovieLens-100K (943 users, 1,682 items, 100,000 ratings)")
