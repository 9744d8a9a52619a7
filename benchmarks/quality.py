"""Quality table: every model and ablation, trained by `fusionrec train`'s code path (Ray Train +
MLflow) over several seeds, reported as mean +- std, next to the dataset's Bayes floor when it has one.

    .venv/bin/python benchmarks/quality.py DATASET --features FEATURES [--split random] [--seeds 0,1,2]
        [--objective rating|implicit] [--protocol candidate|full] [--k 5] [--epochs 30] [--lr 0.005]
        [--id-l2 L2]

Protocol `candidate` (default): test MSE, Precision@K and NDCG@K over each user's test items (the
paper's). Protocol `full`: each trained model is reloaded from MLflow and every test user ranks all
items not rated in train + validation (`fusionrec evaluate --protocol full`): NDCG, Precision,
Recall and both MAPs @K, plus the test RMSE for the rating objective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from fusionrec.data.schema import load_spec
from fusionrec.models.nets import ModelConfig
from fusionrec.train import TrainConfig, train

ROWS = ["fusion:full", "neumf", "svd", "fusion:no_image", "fusion:no_text", "fusion:no_structured", "dnn"]


def _columns(protocol: str, objective: str, k: int) -> list[str]:
    if protocol == "candidate":
        return ["mse", f"precision@{k}", f"ndcg@{k}"]
    ranking = [f"ndcg@{k}", f"precision@{k}", f"recall@{k}", f"map_all@{k}", f"map@{k}"]
    return (["rmse"] if objective == "rating" else []) + ranking


def _metrics(result, dataset: str, protocol: str, k: int) -> dict:
    if protocol == "candidate":
        return result.metrics
    from fusionrec.evaluate import evaluate_bundle
    from fusionrec.registry import download

    return {"rmse": result.metrics["rmse"], **evaluate_bundle(Path(dataset), download(result.model_uri), "full", k)}


def main(dataset: str, features: str = typer.Option(None), split: str = "random", seeds: str = "0,1,2",
         rows: str = ",".join(ROWS), objective: str = "rating", protocol: str = "candidate", k: int = 5,
         epochs: int = 30, lr: float = 5e-3, id_l2: float = typer.Option(None)) -> None:
    if protocol not in ("candidate", "full"):
        raise typer.BadParameter(f"--protocol must be candidate or full, got {protocol!r}")
    floor = load_spec(dataset).truth.get("bayes_mse") if protocol == "candidate" else None
    columns = _columns(protocol, objective, k)
    print(f"{dataset}, split {split}, objective {objective}, protocol {protocol}, {epochs} epochs, lr {lr}, "
          f"id l2 {id_l2 if id_l2 is not None else 'default'}, seeds {seeds}"
          + (f", Bayes floor {floor:.4f}" if floor else ""))
    print("| model | " + " | ".join(columns) + " |" + (" MSE / floor |" if floor else ""))
    print("|---|" + "---|" * len(columns) + ("---|" if floor else ""))
    for row in rows.split(","):
        name, _, variant = row.partition(":")
        results = []
        for seed in seeds.split(","):
            result = train(TrainConfig(dataset=dataset, features=features, split=split, seed=int(seed), k=k,
                                       objective=objective, epochs=epochs, lr=lr, id_l2=id_l2,
                                       model=ModelConfig(model=name, variant=variant or "full")))
            results.append(_metrics(result, dataset, protocol, k))
            print(f"  {row} seed {seed}: best epoch {result.best_epoch}, "
                  + ", ".join(f"{c} {results[-1][c]:.4f}" for c in columns), flush=True)
        cell = {key: (np.mean([r[key] for r in results]), np.std([r[key] for r in results])) for key in columns}
        line = f"| {row} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cell.values()) + " |"
        print(line + (f" {cell['mse'][0] / floor:.2f} |" if floor else ""), flush=True)


if __name__ == "__main__":
    typer.run(main)
