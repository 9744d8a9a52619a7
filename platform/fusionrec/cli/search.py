"""`fusionrec tune` and `fusionrec ablate`: Ray Tune searches and the paper's Table 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import fail, friendly_errors


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
    search: Annotated[str, typer.Option(help="local (small steps from the best trial so far, the defaults "
                                              "first), tpe (Optuna, model-based) or random.")] = "local",
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
    epoch_budget: Annotated[int | None, typer.Option(help="Stop the search once its trials have trained this many "
                                                          "epochs in all (early stopping fits more trials in; "
                                                          "--trials still caps them).")] = None,
    confirm_seeds: Annotated[int, typer.Option(help="Before choosing, train the 3 best trials (and the defaults "
                                                    "trial) again on this many more seeds and choose on the mean; "
                                                    "0: choose on one seed.")] = 2,
) -> None:
    """Search training configurations with Ray Tune, choose on validation, score the choice on test once."""
    import yaml

    from fusionrec.search.tune import search as run_search

    try:
        result = run_search(str(dataset), str(features) if features else None, space, trials=trials, epochs=epochs,
                            max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial, seed=seed, split=split,
                            objective=objective, search_alg=search, early_stopping=early_stopping,
                            register=register, resume=resume, time_budget_s=time_budget,
                            epoch_budget=epoch_budget, confirm_seeds=confirm_seeds)
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
    resume: Annotated[bool, typer.Option(help="Continue the latest interrupted ablation of this dataset, with its "
                                              "own settings; finished fits are kept.")] = False,
) -> None:
    """The paper's Table 1: every model and ablation x K folds as Ray Tune trials, mean ± std."""
    from fusionrec.search.ablate import ablate as run_ablation

    try:
        result = run_ablation(str(dataset), str(features) if features else None, folds=folds, epochs=epochs, out=out,
                              rows=[r.strip() for r in rows.split(",") if r.strip()], seed=seed,
                              cold_start=cold_start, cpus_per_trial=cpus_per_trial, resume=resume)
    except KeyboardInterrupt as interrupted:
        fail(str(interrupted) or "ablation interrupted")
    typer.echo(result.files[0].read_text().rstrip())
    typer.echo(f"wrote {', '.join(str(f) for f in result.files)}")
