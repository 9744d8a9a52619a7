"""`fusionrec ablate`: the paper's Table 1 with error bars.

Eight rows (the full model, NeuMF, SVD, three ablations, the CNN- and DNN-based baselines) x K
folds over the ratings, each fit a Ray Tune trial (a grid over row x fold), as many at once as the
cluster has CPUs for. Each fit chooses its epoch on a validation slice of its fold's training part,
then scores its fold's test part once (the `fusionrec metrics` protocol: MSE, Precision@5,
NDCG@5). Cold-start MSE comes from the same rows trained on the cold-start split (whole users and
items held out), one per fold seed. Writes ablation.md / .csv / .png and logs them to MLflow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrec.config import state_folder
from fusionrec.data.io import atomic_file
from fusionrec.data.splits import cold_start_split, kfold
from fusionrec.evaluate import candidate
from fusionrec.search.space import with_settings
from fusionrec.search.trial import TrialProgress, fit_closing, fit_in_trial, quiet_tune, restore_tuner
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import loop_data, prepare

# row name -> (label in the table, model, variant), in the paper's order
ROWS = {
    "full": ("FusionNeuMF (full)", "fusion", "full"),
    "neumf": ("NeuMF", "neumf", "full"),
    "svd": ("SVD", "svd", "full"),
    "no_image": ("no image", "fusion", "no_image"),
    "no_text": ("no text", "fusion", "no_text"),
    "no_structured": ("no structured", "fusion", "no_structured"),
    "cnn": ("CNN-based", "cnn", "full"),
    "dnn": ("DNN-based", "dnn", "full"),
}
VALIDATION = 0.125  # of each fold's training part: 70/10/20 with 5 folds, as `--split random`
RECORD = "fusionrec-ablation.json"  # an ablation's settings, in its Tune folder: what --resume reruns


def not_applicable(row: str, spec) -> str | None:
    """Why `row` cannot apply to a dataset of `spec` (a DatasetSpec), or None: a row that removes a
    modality the data does not have, or a baseline that reads only what is missing, would train on
    blank inputs and pass for a result."""
    sides = (spec.users, spec.items)
    images = any(s.image for s in sides)
    text = any(s.text for s in sides)
    structured = any(s.categorical or s.numeric for s in sides)
    if row in ("no_image", "cnn") and not images:
        return "n/a: no images" + (" (it reads raw pixels)" if row == "cnn" else "")
    if row == "no_text" and not text:
        return "n/a: no text"
    if row == "no_structured" and not structured:
        return "n/a: no structured attributes"
    if row == "dnn" and not (text or structured):
        return "n/a: no text or structured attributes (it reads nothing else)"
    return None


@dataclass
class AblationResult:
    table: pd.DataFrame  # one row per model: mean and <metric>_std columns
    runs: pd.DataFrame  # one row per fit
    files: list[Path]
    skipped: dict[str, str]  # row -> why it was not trained


def run_fit(config: dict, users, items, ratings, splits: dict, base: dict, threads: int, scoring: dict) -> None:
    """One trial: a row's model on one fold (or one cold-start seed); reports its test metrics."""
    from ray import tune

    from fusionrec.ops.ray_runtime import assigned_device

    _, model, variant = ROWS[config["row"]]
    cfg = TrainConfig.from_dict(with_settings(base, {"model.model": model, "model.variant": variant}))
    split = splits[f"{config['part']}-{config['fold']}"]
    started = time.perf_counter()
    trained, _ = fit_in_trial(cfg, loop_data(users, items, ratings, split), threads, assigned_device())
    seconds = time.perf_counter() - started
    # The epoch was chosen on validation inside fit_in_trial; the test part is scored once, here.
    metrics = candidate(trained, ratings.iloc[split.test], scoring["scale"], scoring["k"], scoring["threshold"],
                        "rating")
    tune.report({**{k: v for k, v in metrics.items() if v is not None}, "train_s": seconds})


def _metric_columns(k: int) -> list[str]:
    return ["mse", f"precision@{k}", f"ndcg@{k}", "train_s", "cold_start_mse"]


def summarise(runs: pd.DataFrame, rows: list[str], k: int) -> pd.DataFrame:
    """Mean and std over folds per row: `mse`, ..., then `<metric>_std` (cold start from its own fits)."""
    columns = _metric_columns(k)
    folds = runs[runs["part"] == "folds"].groupby("row")
    cold = runs[runs["part"] == "cold"].groupby("row")["mse"]
    table = pd.DataFrame(index=pd.Index(rows, name="row"))
    for column in columns[:-1]:
        table[column] = folds[column].mean()
        table[f"{column}_std"] = folds[column].std(ddof=0)
    table["cold_start_mse"] = cold.mean()
    table["cold_start_mse_std"] = cold.std(ddof=0)
    return table[columns + [f"{c}_std" for c in columns]]


def _cell(mean, std, digits: int = 4) -> str:
    return "–" if pd.isna(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(table: pd.DataFrame, k: int, title: str, skipped: dict[str, str], floor: float | None) -> str:
    columns = _metric_columns(k)
    names = {"mse": "MSE", f"precision@{k}": f"P@{k}", f"ndcg@{k}": f"NDCG@{k}", "train_s": "train s / fit",
             "cold_start_mse": "cold-start MSE"}
    lines = [f"# {title}", "", "| model | " + " | ".join(names[c] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for row, values in table.iterrows():
        if row in skipped:
            lines.append(f"| {ROWS[row][0]} | " + " | ".join([skipped[row]] * len(columns)) + " |")
            continue
        lines.append(f"| {ROWS[row][0]} | " + " | ".join(
            _cell(values[c], values[c + "_std"], 1 if c == "train_s" else 4) for c in columns) + " |")
    if floor:
        lines += ["", f"Bayes floor (the best test MSE any model can reach on this data): {floor:.4f}."]
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, k: int, path: Path, skipped: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table.drop(index=list(skipped))
    metrics = ["mse", f"precision@{k}", f"ndcg@{k}", "cold_start_mse"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4))
    for ax, metric in zip(axes, metrics, strict=True):
        ax.bar(range(len(shown)), shown[metric], yerr=shown[f"{metric}_std"], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(shown)), [ROWS[r][0] for r in shown.index], rotation=60, ha="right")
        ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _settings(dataset: str, resume: bool, given: dict) -> tuple[Path | None, dict]:
    """(the Tune folder to resume, or None; the ablation's settings): `given`, or on --resume the
    recorded settings of the latest ablation of `dataset` that did not finish."""
    if not resume:
        return None, given
    dataset = str(Path(dataset).resolve())
    for folder in sorted((state_folder() / "ablate").glob("ablate-*"), reverse=True):
        record = folder / RECORD
        if record.is_file() and (settings := json.loads(record.read_text()))["dataset"] == dataset:
            return folder, settings
    raise ValueError(f"no earlier ablation of {dataset} under {state_folder() / 'ablate'} to resume")


def ablate(dataset: str, features: str | None, folds: int = 5, epochs: int = 10, out: Path = Path("reports"),
           rows: list[str] | None = None, seed: int = 0, cold_start: bool = True, cpus_per_trial: float = 1,
           max_concurrent: int | None = None, progress: bool = True, resume: bool = False) -> AblationResult:
    """The whole `fusionrec ablate` (see the module docstring). Interrupted (Ctrl-C): raises
    KeyboardInterrupt after Tune saved its state; `resume=True` continues the latest ablation of
    `dataset` with its recorded settings (the others given here are not used), and the fits that
    finished are not run again."""
    import mlflow
    from ray import tune

    from fusionrec import registry
    from fusionrec.ops.ray_runtime import concurrent_trials, ensure_ray, trial_resources

    folder, settings = _settings(dataset, resume, {
        "dataset": str(Path(dataset).resolve()), "features": str(Path(features).resolve()) if features else None,
        "folds": folds, "epochs": epochs, "rows": rows or list(ROWS), "seed": seed, "cold_start": cold_start})
    dataset, features, folds, epochs, rows, seed, cold_start = (settings[k] for k in (
        "dataset", "features", "folds", "epochs", "rows", "seed", "cold_start"))
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown row {unknown[0]!r}: choose from {', '.join(ROWS)}")
    if folds < 2 or epochs < 1:
        raise ValueError("--folds must be at least 2 and --epochs at least 1")
    base = {"dataset": str(dataset), "features": str(features) if features else None, "epochs": epochs,
            "seed": seed, "objective": "rating"}
    prepared = prepare(TrainConfig.from_dict(base), pixels="cnn" in rows)
    spec = prepared.dataset.spec
    if (spec.users.text or spec.items.text or spec.users.image or spec.items.image) and not features:
        raise ValueError(f"{dataset} has text or images: pass --features (from `fusionrec encode`) so the "
                         "multimodal rows see them")
    skipped = {r: why for r in rows if (why := not_applicable(r, spec))}
    trained_rows = [r for r in rows if r not in skipped]
    ratings = prepared.ratings
    splits = {f"folds-{f}": s for f, s in enumerate(kfold(len(ratings), folds, seed, validation=VALIDATION))}
    parts = ["folds"]
    if cold_start:
        parts.append("cold")
        splits |= {f"cold-{f}": cold_start_split(ratings, seed=seed + f) for f in range(folds)}
    scoring = {"scale": (spec.rating_min, spec.rating_max), "k": 5, "threshold": spec.relevance_threshold}

    registry.setup()
    ensure_ray()
    quiet_tune()
    concurrency = max_concurrent or concurrent_trials(cpus_per_trial)
    total = len(trained_rows) * folds * len(parts)

    def describe(trial, state: str) -> str:
        result, config = trial.last_result or {}, trial.config
        score = f"test MSE {result['mse']:.4f} in {result['train_s']:.0f}s" if "mse" in result else state
        return f"{config['row']:>13} {config['part']} {config['fold']}: {score}"

    callback = TrialProgress(total, describe) if progress else None
    trainable = tune.with_resources(
        tune.with_parameters(run_fit, users=prepared.users, items=prepared.items, ratings=ratings, splits=splits,
                             base=base, threads=max(1, int(cpus_per_trial)), scoring=scoring),
        trial_resources(cpus_per_trial))
    if folder:
        tuner = restore_tuner(folder, trainable, resume_unfinished=True, resume_errored=True)
    else:
        folder = state_folder() / "ablate" / f"ablate-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        tuner = tune.Tuner(
            trainable,
            param_space={"row": tune.grid_search(trained_rows), "part": tune.grid_search(parts),
                         "fold": tune.grid_search(list(range(folds)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=folder.name, storage_path=str(folder.parent), verbose=0,
                                      callbacks=[callback] if callback else None))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RECORD).write_text(json.dumps(settings))
    grid = fit_closing(tuner, callback)
    failed = [r for r in grid if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} of {total} fits failed, e.g. {failed[0].config}: "
                           f"{str(failed[0].error).splitlines()[0]}")
    if len(grid) < total or grid.num_terminated < total:
        raise KeyboardInterrupt(f"ablation interrupted after {grid.num_terminated} of {total} fits; "
                                f"continue it with --resume ({folder})")
    runs = pd.DataFrame([{**r.config, **r.metrics} for r in grid])
    runs = runs[["row", "part", "fold", *[c for c in _metric_columns(5)[:-1] if c in runs]]]
    table = summarise(runs, rows, 5)
    floor = spec.truth.get("bayes_mse")
    title = (f"Ablation on {spec.name}: {folds}-fold, {epochs} epochs, epoch chosen on validation, "
             f"mean ± std over folds")
    out = Path(out)
    files = [out / "ablation.md", out / "ablation.csv", out / "ablation.png"]
    with atomic_file(files[0]) as tmp:
        tmp.write_text(markdown(table, 5, title, skipped, floor))
    with atomic_file(files[1]) as tmp:
        table.rename_axis("model").reset_index().to_csv(tmp, index=False)
    with atomic_file(files[2]) as tmp:
        plot(table, 5, tmp, skipped)
    with mlflow.start_run(run_name=f"ablate {spec.name}"):
        mlflow.log_params({"dataset": dataset, "features": features, "folds": folds, "epochs": epochs,
                           "seed": seed, "rows": ",".join(rows), "cold_start": cold_start})
        mlflow.log_metrics({f"{row}.{metric.replace('@', '_at_')}": float(value)
                            for row, values in table.iterrows() for metric, value in values.items()
                            if not np.isnan(value)})
        for path in files:
            mlflow.log_artifact(str(path))
    return AblationResult(table, runs, files, skipped)
