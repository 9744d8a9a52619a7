"""`fusionrec train` and `fusionrec promote`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import at_least, friendly_errors
from fusionrec.models.config import ModelConfig
from fusionrec.training.config import CODE_PRIOR, ID_L2, TrainConfig


def _per_objective(defaults: dict[str, float]) -> str:
    return ", ".join(f"{value:g} for {objective}" for objective, value in defaults.items())


def _widths(value: str) -> list[int]:
    try:
        return [int(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 128,64, got {value!r}") from None


_MLP = ",".join(map(str, ModelConfig().mlp))  # (a list default: a factory's, shown as the flag takes it)


@friendly_errors
def train(
    ctx: typer.Context,
    dataset: Annotated[Path | None, typer.Argument(help="Dataset folder (or the config's `dataset`).")] = None,
    config: Annotated[Path | None, typer.Option(help="Training settings as YAML (e.g. the best.yaml that "
                                                     "`fusionrec tune` writes); flags given as well win.")] = None,
    features: Annotated[Path | None, typer.Option(help="Feature tables from `fusionrec encode`.")] = None,
    model: Annotated[str, typer.Option(help="fusion, neumf, svd, dnn, cnn, or the cold-item baselines genre-pop "
                                            "and content-knn (see `fusionrec models list`).")]
    = ModelConfig.model,
    variant: Annotated[str, typer.Option(help="full, no_image, no_text, no_structured or id_only.")]
    = ModelConfig.variant,
    mlp: Annotated[str, typer.Option(help="MLP widths, comma-separated.")] = _MLP,
    codebooks: Annotated[int, typer.Option(help="Text/image projections as this many softmaxes over learned codes "
                                                "(0: linear projections).", callback=at_least(0))]
    = ModelConfig.codebooks,
    epochs: Annotated[int, typer.Option(help="Training epochs (the best on validation is kept).")] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(help="Ratings per batch (per worker).")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = TrainConfig.lr,
    objective: Annotated[str, typer.Option(help="rating (MSE on stars) or implicit (BCE, sampled negatives).")]
    = TrainConfig.objective,
    workers: Annotated[int, typer.Option(help="Ray Train workers (DDP).")] = TrainConfig.workers,
    split: Annotated[str, typer.Option(help="random (70/10/20), stratified (75/25 per user), cold-start, "
                                            "cold-items (20 % of items held out whole) or loo.")]
    = TrainConfig.split,
    seed: Annotated[int, typer.Option(help="Seed for the split (and the training, without --train-seed).")]
    = TrainConfig.seed,
    train_seed: Annotated[int | None, typer.Option(help="Seed for the initialisation, batch order and sampled "
                                                        "negatives, on --seed's split (default: --seed).")]
    = TrainConfig.train_seed,
    id_l2: Annotated[float | None, typer.Option(help="Weight decay on the id embeddings (default: "
                                                     f"{_per_objective(ID_L2)}).")] = TrainConfig.id_l2,
    code_prior: Annotated[float | None, typer.Option(
        help="Strength of the prior on FusionNeuMF's codebook logit weights, in ratings: their weight decay is "
             f"this / the training ratings (default: {_per_objective(CODE_PRIOR)}).")] = TrainConfig.code_prior,
    ema_decay: Annotated[float, typer.Option(help="Decay of the moving average of the weights that is validated "
                                                  "and kept (0: the weights as trained).")] = TrainConfig.ema_decay,
    register: Annotated[bool, typer.Option(help="Register in MLflow; champion moves only over a champion of the "
                                                "same data, split and objective that it beats on validation.")]
    = False,
) -> None:
    """Train a model with Ray Train, log it to MLflow, print the test metrics as one JSON object."""
    from fusionrec.data.schema import load_spec
    from fusionrec.training.command import train as run_training
    from fusionrec.training.config import load_config

    flags = {"dataset": str(dataset) if dataset else None, "features": str(features) if features else None,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "objective": objective, "workers": workers,
             "split": split, "seed": seed, "train_seed": train_seed, "id_l2": id_l2, "code_prior": code_prior,
             "ema_decay": ema_decay}
    model_flags = {"model": model, "variant": variant, "mlp": _widths(mlp), "codebooks": codebooks}
    if config is None:
        settings = {**flags, "model": model_flags}
    else:  # the file's settings, with the flags given on the command line on top
        def given(name: str) -> bool:
            # by name: Typer carries its own copy of click, whose ParameterSource is another class
            return getattr(ctx.get_parameter_source(name), "name", None) in ("COMMANDLINE", "ENVIRONMENT")

        settings = load_config(config).to_dict()
        settings |= {k: v for k, v in flags.items() if given(k)}
        settings["model"] |= {k: v for k, v in model_flags.items() if given(k)}
    if not settings["dataset"]:
        raise ValueError("name the dataset: fusionrec train DATASET (or `dataset:` in --config)")
    train_config = TrainConfig.from_dict(settings)  # checked as it is made
    result = run_training(train_config, register=register)
    metric, value = result.selection
    floor = load_spec(Path(train_config.dataset)).truth.get("bayes_mse")
    line = f"best epoch {result.best_epoch} ({metric} {value:.4f})"
    if floor and result.metrics["mse"] is not None:
        line = (f"test MSE {result.metrics['mse']:.4f} vs the Bayes floor {floor:.4f} "
                f"(ratio {result.metrics['mse'] / floor:.2f}); {line}")
    typer.echo(line, err=True)
    if result.promotion:
        typer.echo(result.promotion.line(), err=True)
    typer.echo(json.dumps(result.metrics))


@friendly_errors
def promote(
    version: Annotated[str, typer.Option(help="Registered version of fusionrec to make champion.")],
) -> None:
    """Move alias `champion` to a version; a running service switches to it within seconds."""
    from fusionrec.registry import CHAMPION, MODEL_NAME
    from fusionrec.registry import promote as move_alias

    before = move_alias(version)
    typer.echo(f"{MODEL_NAME}@{CHAMPION}: version {before or '(none)'} -> {version}")
