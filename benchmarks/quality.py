"""Quality table: every model and ablation, trained by `fusionrec train`'s code path (Ray Train +
MLflow) over several seeds, reported as mean +- std of test MSE, Precision@5 and NDCG@5
(candidate protocol), next to the dataset's Bayes floor when it has one.

    .venv/bin/python benchmarks/quality.py DATASET --features FEATURES [--split random] [--seeds 0,1,2]
"""

from __future__ import annotations

import numpy as np
import typer

from fusionrec.data.schema import load_spec
from fusionrec.models.nets import ModelConfig
from fusionrec.train import TrainConfig, train

ROWS = ["fusion:full", "neumf", "svd", "fusion:no_image", "fusion:no_text", "fusion:no_structured", "dnn"]


def main(dataset: str, features: str = typer.Option(None), split: str = "random", seeds: str = "0,1,2",
         rows: str = ",".join(ROWS)) -> None:
    floor = load_spec(dataset).truth.get("bayes_mse")
    print(f"{dataset}, split {split}, seeds {seeds}" + (f", Bayes floor {floor:.4f}" if floor else ""))
    print("| model | test MSE | P@5 | NDCG@5 |" + (" MSE / floor |" if floor else ""))
    print("|---|---|---|---|" + ("---|" if floor else ""))
    for row in rows.split(","):
        name, _, variant = row.partition(":")
        results = [train(TrainConfig(dataset=dataset, features=features, split=split, seed=int(seed),
                                     model=ModelConfig(model=name, variant=variant or "full"))).metrics
                   for seed in seeds.split(",")]
        cell = {key: (np.mean([r[key] for r in results]), np.std([r[key] for r in results]))
                for key in ("mse", "precision@5", "ndcg@5")}
        line = f"| {row} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cell.values()) + " |"
        print(line + (f" {cell['mse'][0] / floor:.2f} |" if floor else ""), flush=True)


if __name__ == "__main__":
    typer.run(main)
