"""Quality table: every model and ablation, trained by `fusionrec train`'s code path (Ray Train +
MLflow) over several seeds, reported as mean +- std, next to the dataset's Bayes floor when it has one.

    .venv/bin/python benchmarks/quality.py DATASET --features FEATURES [--split random] [--seeds 0,1,2]
        [--train-runs 1] [--objective rating|implicit] [--protocol candidate|full] [--k 5] [--epochs 30]
        [--lr 0.005] [--id-l2 L2] [--config FILE]

`--seeds` are split seeds. `--train-runs N` trains each split N times (training seeds s, s+100, ...):
two runs of one model on one split can differ by more than two models do (docs/quality.md), so a
comparison on one run per split measures the training's luck as much as the models. Each row's cell
is then over every run, and each row after the first is also compared with the first, paired on
split and training seed: the mean difference and, per split, the difference of the runs' means.

`--config FILE`: the settings of `fusionrec train --config` (e.g. the best.yaml of `fusionrec tune`)
as the base of every row; a row sets the model and variant, the options given here win.

Protocol `candidate` (default): test MSE, Precision@K and NDCG@K over each user's test items (the
paper's). Protocol `full`: each trained model is reloaded from MLflow and every test user ranks all
items not rated in train + validation (`fusionrec evaluate --protocol full`): NDCG, Precision,
Recall and both MAPs @K, plus the test RMSE for the rating objective.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
import yaml

from fusionrec.data.schema import load_spec
from fusionrec.training.command import train
from fusionrec.training.config import TrainConfig, load_config

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
    from fusionrec.registry import local_bundle

    with local_bundle(result.model_uri) as folder:
        return {"rmse": result.metrics["rmse"], **evaluate_bundle(Path(dataset), folder, "full", k)}


def _base(dataset: str, config: str | None, options: dict) -> dict:
    """Training settings shared by every row: the defaults, the config file's, then the options given."""
    base = TrainConfig(dataset=dataset).to_dict() | {"id_l2": None, "code_prior": None}  # None: the objective's
    if config:
        load_config(Path(config))  # a bad file fails here, in one line
        stated = yaml.safe_load(Path(config).read_text())
        base |= stated | {"model": base["model"] | stated.get("model", {})}
    return base | {"dataset": dataset} | {key: value for key, value in options.items() if value is not None}


def _versus_first(scores: dict[str, dict[tuple[int, int], float]], column: str) -> None:
    """Each row after the first against the first on `column`, paired on (split seed, training seed)."""
    first, *others = scores
    sign = -1 if column in ("mse", "rmse") else 1  # +1: higher is better
    print(f"against {first} on {column} ({'lower' if sign < 0 else 'higher'} is better), paired on split and "
          "training seed:")
    for row in others:
        pairs = sorted(set(scores[row]) & set(scores[first]))
        gaps = np.array([scores[row][pair] - scores[first][pair] for pair in pairs])
        splits = sorted({seed for seed, _ in pairs})
        per_split = [np.mean([g for (s, _), g in zip(pairs, gaps, strict=True) if s == seed]) for seed in splits]
        print(f"  {row}: {gaps.mean():+.4f} ± {gaps.std():.4f} over {len(gaps)} runs, better in "
              f"{int((sign * gaps > 0).sum())}; per split (mean of its runs): "
              + ", ".join(f"{seed} {gap:+.4f}" for seed, gap in zip(splits, per_split, strict=True))
              + f"; worst split {min(per_split, key=lambda gap: sign * gap):+.4f}", flush=True)


def main(dataset: str, features: str = typer.Option(None), split: str = typer.Option(None), seeds: str = "0,1,2",
         train_runs: int = typer.Option(1, min=1, help="Training runs per split seed (training seeds s, s+100, ...)."),
         rows: str = ",".join(ROWS), objective: str = typer.Option(None), protocol: str = "candidate",
         k: int = typer.Option(None), epochs: int = typer.Option(None), lr: float = typer.Option(None),
         id_l2: float = typer.Option(None), code_prior: float = typer.Option(None),
         config: str = typer.Option(None)) -> None:
    if protocol not in ("candidate", "full"):
        raise typer.BadParameter(f"--protocol must be candidate or full, got {protocol!r}")
    base = _base(dataset, config, {"features": features, "split": split, "objective": objective, "k": k,
                                   "epochs": epochs, "lr": lr, "id_l2": id_l2,
                                   "code_prior": code_prior})
    objective, k = base["objective"], base["k"]
    floor = load_spec(dataset).truth.get("bayes_mse") if protocol == "candidate" else None
    columns = _columns(protocol, objective, k)
    print(f"{dataset}, split {base['split']}, objective {objective}, protocol {protocol}, {base['epochs']} epochs, "
          f"lr {base['lr']}, "
          + "".join(f"{key.replace('_', ' ')} {'default' if base[key] is None else base[key]}, "
                    for key in ("id_l2", "code_prior"))
          + f"seeds {seeds}" + (f" x {train_runs} training runs" if train_runs > 1 else "")
          + (f", config {config}" if config else "") + (f", Bayes floor {floor:.4f}" if floor else ""))
    print("| model | " + " | ".join(columns) + " |" + (" MSE / floor |" if floor else ""))
    print("|---|" + "---|" * len(columns) + ("---|" if floor else ""))
    scores = {}  # row -> (split seed, training seed) -> the first column
    for row in rows.split(","):
        name, _, variant = row.partition(":")
        model = base["model"] | {"model": name, "variant": variant or "full"}
        results, scores[row] = [], {}
        for seed in map(int, seeds.split(",")):
            for train_seed in range(seed, seed + 100 * train_runs, 100):
                result = train(TrainConfig.from_dict(base | {"seed": seed, "train_seed": train_seed, "model": model}))
                results.append(_metrics(result, dataset, protocol, k))
                scores[row][seed, train_seed] = results[-1][columns[0]]
                metric, value = result.selection
                print(f"  {row} seed {seed}" + (f" training seed {train_seed}" if train_runs > 1 else "")
                      + f": best epoch {result.best_epoch} ({metric} {value:.4f}), "
                      + ", ".join(f"{c} {results[-1][c]:.4f}" for c in columns), flush=True)
        cell = {key: (np.mean([r[key] for r in results]), np.std([r[key] for r in results])) for key in columns}
        line = f"| {row} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cell.values()) + " |"
        print(line + (f" {cell['mse'][0] / floor:.2f} |" if floor else ""), flush=True)
    if len(scores) > 1:
        _versus_first(scores, columns[0])


if __name__ == "__main__":
    typer.run(main)
