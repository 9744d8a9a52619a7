"""`fusionrec metrics` (score a predictions table), `runs` (training runs side by side) and
`evaluate` (a registered model on its test split)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fusionrec.cli.base import at_least, fail, friendly_errors


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
    from fusionrec.registry import local_bundle, resolve

    # resolve first: an unknown URI or an empty registry is one line naming it, not MLflow's own error
    with local_bundle(resolve(model_uri).uri) as folder:
        result = evaluate_bundle(dataset, folder, protocol, k)
    typer.echo(json.dumps({"protocol": protocol, **result}))
