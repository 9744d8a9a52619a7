"""The whole `fusionrec train` as a library call (`train`): prepare the data, fit on Ray (choosing
the epoch on validation), score the test part once (`score_test`), log to MLflow, register.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fusionrec.config import state_folder
from fusionrec.evaluate import candidate
from fusionrec.models.config import NO_GRADIENT
from fusionrec.models.nets import Recommender
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import Prepared, prepare
from fusionrec.training.ray_train import fit
from fusionrec.training.tracking import EpochProgress, as_test_metrics, log_config, log_loss_curve, log_trained_model


@dataclass
class TrainResult:
    metrics: dict  # test metrics, scored once after selection
    run_id: str | None
    best_epoch: int
    selection: tuple[str, float]  # (metric, best value on validation)
    model_uri: str | None = None  # the logged MLflow model (for `registry.download`)
    promotion: object | None = None  # registry.Promotion when registered


def score_test(model: Recommender, cfg: TrainConfig, prepared: Prepared) -> dict:
    """The test metrics (candidate protocol): call once, after every choice is made."""
    spec = prepared.dataset.spec
    return candidate(model, prepared.part("test"), (spec.rating_min, spec.rating_max), cfg.k,
                     spec.relevance_threshold, cfg.objective)


def train(cfg: TrainConfig, register: bool = False) -> TrainResult:
    """The whole `fusionrec train`: fit on Ray (choosing the epoch on validation), score the test part
    once, log to MLflow, register. `cfg` was checked when it was made (TrainConfig)."""
    import mlflow

    from fusionrec import registry

    prepared = prepare(cfg)
    registry.setup()
    storage = state_folder() / "ray_results"
    storage.mkdir(parents=True, exist_ok=True)
    with mlflow.start_run() as run:
        log_config(cfg, prepared)
        target = {"uri": registry.tracking_uri(), "run_id": run.info.run_id}
        trains = cfg.model.model not in NO_GRADIENT  # the others have no epochs to follow or loss to plot
        with EpochProgress(run.info.run_id, cfg.epochs) if trains else contextlib.nullcontext():
            model, saved = fit(cfg, prepared, storage, target)
        best = saved["best"]
        metrics = score_test(model, cfg, prepared)
        mlflow.log_metrics({cfg.selection.metric: best["value"], "best_epoch": best["epoch"],
                            **as_test_metrics(metrics)})
        if trains:
            log_loss_curve(run.info.run_id)
        model_uri = log_trained_model(model, cfg, prepared, run.info.run_id, metrics)
    result = TrainResult(metrics, run.info.run_id, best["epoch"], (cfg.selection.metric, best["value"]), model_uri)
    if register:
        result.promotion = registry.register(model_uri, run.info.run_id)
    return result
