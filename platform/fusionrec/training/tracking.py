"""MLflow for training runs: the params and identity tags of a run, each epoch's history (logged by
the rank-0 worker or a Tune trial), the progress bar that follows it, the loss curve, the test
metrics and the logged model bundle. MLflow itself is imported where it is used.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fusionrec.encoders.pipeline import feature_encoders
from fusionrec.models.bundle import save_bundle
from fusionrec.training.config import TrainConfig

if TYPE_CHECKING:
    from fusionrec.models.nets import Recommender
    from fusionrec.training.data import Prepared


def log_epoch(mlflow_target: dict | None, metrics: dict) -> None:
    """One epoch's metrics as MLflow history. The selection metric goes in as `epoch_<name>`: the
    plain name holds the best epoch's value, logged once at the end (what the registry compares).
    An epoch logged but not yet checkpointed when a worker failed is run again after the restart
    and logged again at the same step: MLflow's history keeps both, and the later one (the epoch
    the model went on from) is the one that counts, as MLflow's latest value and in the loss curve."""
    if not mlflow_target:
        return
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_target["uri"])
    history = {"train_loss": "train_loss", "val_loss": "val_loss", "samples_per_s": "samples_per_s"}
    history = {name: logged_as for name, logged_as in history.items() if name in metrics}  # (one-pass fits)
    history |= {name: f"epoch_{name}" for name in metrics if name.startswith("val_") and name != "val_loss"}
    history |= {name: name for name in metrics if name.startswith("param_checksum_rank")}  # replica_checksums
    for name, logged_as in history.items():
        client.log_metric(mlflow_target["run_id"], logged_as, metrics[name], step=metrics["epoch"])


RESUMED = "resumed_from_epoch"  # a metric: one point each time training resumed from a checkpoint


def log_resume(mlflow_target: dict | None, epoch: int) -> None:
    """Training resumed from the checkpoint of `epoch` (Ray Train restarted the workers after one
    failed): recorded in the run, where the driver (EpochProgress) sees it and says so."""
    if mlflow_target:
        from mlflow import MlflowClient

        MlflowClient(mlflow_target["uri"]).log_metric(mlflow_target["run_id"], RESUMED, epoch, step=epoch)


class EpochProgress:
    """A progress bar over epochs in this process, fed by the per-epoch metrics that the rank-0
    worker logs to MLflow (worker output is not forwarded here). A run resumed after a failure
    logs some epochs again: the bar stays at the furthest epoch logged, and a line says which
    checkpoint it resumed from (`log_resume`), once for each resumption."""

    def __init__(self, run_id: str, epochs: int, every_s: float = 1.0):
        from tqdm import tqdm

        self.run_id, self.every_s = run_id, every_s
        self.resumes_told = 0
        self.bar = tqdm(total=epochs, desc="training", unit="epoch", disable=None)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="fusionrec-epoch-progress", daemon=True)

    def _update(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient()
        resumes = sorted(client.get_metric_history(self.run_id, RESUMED), key=lambda m: m.timestamp)
        for resume in resumes[self.resumes_told:]:
            self.bar.write(f"training resumed from the checkpoint of epoch {int(resume.value)} after a worker "
                           "failed", file=sys.stderr)
        self.resumes_told = len(resumes)
        history = client.get_metric_history(self.run_id, "val_loss")
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            self.bar.n = last.step + 1
            self.bar.set_postfix(val_loss=f"{last.value:.4f}")  # (also redraws the bar)

    def _follow(self) -> None:
        while not self.stopping.wait(self.every_s):
            self._update()

    def __enter__(self) -> EpochProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join()
        self._update()
        self.bar.close()


def log_loss_curve(run_id: str) -> None:
    """The run's train and validation loss per epoch, as the artifact loss_curve.png of the active run
    (an epoch run again after a worker failed: its later value)."""
    import mlflow
    from mlflow import MlflowClient

    history = {}
    for name in ("train_loss", "val_loss"):
        latest = {m.step: m.value for m in sorted(MlflowClient().get_metric_history(run_id, name),
                                                  key=lambda m: m.timestamp)}
        history[name] = sorted(latest.items())
    with tempfile.TemporaryDirectory() as folder:
        loss_curve_png(history, Path(folder) / "loss_curve.png")
        mlflow.log_artifact(str(Path(folder) / "loss_curve.png"))


def loss_curve_png(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in history.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_identity(cfg: TrainConfig, prepared: Prepared) -> dict[str, str]:
    """The MLflow tags saying what a run was trained on and selected by (selection.IDENTITY)."""
    from fusionrec.registry import identity_tags

    return identity_tags({**prepared.fingerprints, "split": cfg.split, "seed": cfg.seed, "objective": cfg.objective},
                         cfg.selection.metric, cfg.selection.mode)


def as_test_metrics(metrics: dict) -> dict[str, float]:
    """Test metrics under their MLflow names ("precision@5" -> "test_precision_at_5"); Nones left out."""
    return {f"test_{k.replace('@', '_at_')}": v for k, v in metrics.items() if v is not None}


def log_trained_model(model: Recommender, cfg: TrainConfig, prepared: Prepared, run_id: str, metrics: dict) -> str:
    """Log the model as a bundle to the active MLflow run; returns its model URI."""
    from fusionrec import registry

    spec = prepared.dataset.spec
    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder) / "bundle"
        save_bundle(bundle, model, prepared.users, prepared.items, {
            "dataset": spec.name, "rating_scale": [spec.rating_min, spec.rating_max],
            "relevance_threshold": spec.relevance_threshold, "objective": cfg.objective, "split": cfg.split,
            "seed": cfg.seed, "run_id": run_id, "test_metrics": metrics, "fingerprints": prepared.fingerprints,
            "encoders": feature_encoders(Path(cfg.features)) if cfg.features else {},
        }, seen=prepared.part("fitted")[["user_idx", "item_idx"]].to_numpy())
        return registry.log_bundle(bundle)


def log_config(cfg: TrainConfig, prepared: Prepared) -> None:
    """Params and identity tags of the active MLflow run."""
    import mlflow

    mlflow.log_params(config_params(cfg, prepared.dataset.spec.name, len(prepared.split.train)))
    mlflow.set_tags(run_identity(cfg, prepared))


def config_params(cfg: TrainConfig, dataset_name: str, train_ratings: int) -> dict:
    """A configuration as flat MLflow params ("lr", "model.mlp", ...), with the training part's size
    and the codebooks' decay that follows from it."""
    return {"dataset": dataset_name, "dataset_path": cfg.dataset, "features": cfg.features,
            **{f"model.{k}": v for k, v in asdict(cfg.model).items()},
            **{k: v for k, v in asdict(cfg).items() if k not in ("model", "dataset", "features")},
            "train_ratings": train_ratings, "code_l2": cfg.code_l2(train_ratings)}
