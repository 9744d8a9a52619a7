"""MLflow: where runs are tracked and the registered model `fusionrec` lives.

Tracking defaults to a SQLite file in the state folder ($FUSIONREC_HOME or ./.fusionrec), with
artifacts beside it; any MLFLOW_TRACKING_URI (a tracking server) works the same. The served
model is the registered version carrying alias `champion`; promotion moves the alias.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fusionrec.config import state_folder
from fusionrec.selection import IDENTITY, Selection
from fusionrec.verbosity import without_mlflow_notices

if TYPE_CHECKING:
    from mlflow.entities import RunData

MODEL_NAME = "fusionrec"
CHAMPION = "champion"
EXPERIMENT = "fusionrec"
CHAMPION_URI = f"models:/{MODEL_NAME}@{CHAMPION}"


def default_tracking_uri() -> str:
    return f"sqlite:///{state_folder() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def setup() -> str:
    """Point MLflow at our tracking URI and experiment; returns the experiment id."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    state_folder().mkdir(parents=True, exist_ok=True)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)  # (MLflow also exports it as MLFLOW_TRACKING_URI)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        # With our SQLite default, artifacts go beside it; a tracking server decides for itself.
        artifacts = (state_folder() / "mlartifacts").as_uri() if uri == default_tracking_uri() else None
        experiment_id = mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
    else:
        experiment_id = experiment.experiment_id
    # Runs must land in this experiment: MLflow's "Default" one would put artifacts in ./mlruns.
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _pyfunc_class():
    import mlflow.pyfunc

    class BundleModel(mlflow.pyfunc.PythonModel):
        """pyfunc face of a bundle: a frame of user_id, item_id -> predicted scores (unknown ids
        score from content alone, as cold-start entities)."""

        def load_context(self, context):
            from fusionrec.models.bundle import load_bundle

            self.model, self.meta = load_bundle(Path(context.artifacts["bundle"]))

        def predict(self, context, model_input, params=None):
            from fusionrec.evaluate import predict
            from fusionrec.models.content import row_index, rows_of

            u = rows_of(model_input["user_id"], row_index(self.meta["users"]["ids"]))
            i = rows_of(model_input["item_id"], row_index(self.meta["items"]["ids"]))
            scale = tuple(self.meta["rating_scale"]) if self.meta["objective"] == "rating" else None
            return predict(self.model, u, i, scale)

    return BundleModel


def log_bundle(folder: Path) -> str:
    """Log a model bundle (see models/bundle.py) as the active run's pyfunc model; returns its URI."""
    import mlflow.pyfunc

    info = mlflow.pyfunc.log_model(name="model", python_model=_pyfunc_class()(), artifacts={"bundle": str(folder)},
                                   pip_requirements=["fusionrec"])
    return info.model_uri


TAG = "fusionrec."  # a run's IDENTITY (selection.py) is tagged "fusionrec.<key>"


def identity_tags(identity: dict[str, object], metric: str, mode: str) -> dict[str, str]:
    """The tags a training run carries: its identity (IDENTITY's keys) and its selection metric."""
    missing = sorted(set(IDENTITY) - set(identity))
    if missing:
        raise ValueError(f"a run's identity lacks {', '.join(missing)}")
    return {f"{TAG}{k}": str(v) for k, v in identity.items()} | {
        f"{TAG}selection_metric": metric, f"{TAG}selection_mode": mode}


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    reason: str  # one line: why the alias moved or stayed

    def line(self) -> str:
        state = f"now {CHAMPION}" if self.promoted else f"{CHAMPION} unchanged"
        return f"registered {MODEL_NAME} version {self.version}: {state} ({self.reason})"


def decide(new: RunData, champion: tuple[str, RunData] | None) -> tuple[bool, str]:
    """Whether a run (its MLflow `data`: tags, metrics) should take the alias from `champion`
    ((version, its run's data), or None), and why: the promotion rule, without a store."""
    metric, mode = new.tags.get(f"{TAG}selection_metric"), new.tags.get(f"{TAG}selection_mode")
    value = new.metrics.get(metric) if metric else None
    if value is None or math.isnan(value):
        return False, "this run recorded no selection metric"
    if champion is None:
        return True, f"no {CHAMPION} yet; {metric} {value:.4f}"
    version, old = champion
    for key, label in IDENTITY.items():
        mine, theirs = new.tags.get(f"{TAG}{key}"), old.tags.get(f"{TAG}{key}")
        if mine is None or mine != theirs:
            return False, (f"version {version} was trained on another {label} "
                           f"({theirs or 'unrecorded'} vs {mine or 'unrecorded'}); compare like with like "
                           "or use `fusionrec promote`")
    if old.tags.get(f"{TAG}selection_metric") != metric:
        return False, f"version {version} was selected on another metric"
    before = old.metrics.get(metric)
    if before is None or math.isnan(before):
        return True, f"{metric} {value:.4f}; version {version} recorded none"
    if Selection(metric, mode).better(value, before):
        return True, f"{metric} {value:.4f} beats version {version}'s {before:.4f}"
    return False, f"{metric} {value:.4f} does not beat version {version}'s {before:.4f}"


def register(model_uri: str, run_id: str) -> Promotion:
    """Register a logged model under MODEL_NAME. The alias `champion` moves to it only if there is
    none yet, or if the champion was trained on the same dataset, feature tables, split and
    objective and this model is better on their selection metric (validation data only)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
        champion = (current.version, client.get_run(current.run_id).data)
    except MlflowException:
        champion = None
    promoted, reason = decide(client.get_run(run_id).data, champion)
    with without_mlflow_notices():  # we say which version it is, and whether it is champion, ourselves
        version = str(mlflow.register_model(model_uri, MODEL_NAME).version)
    if promoted:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    return Promotion(version, promoted, reason)


def download(model_uri: str, dst: Path) -> Path:
    """The bundle folder of a registered model (models:/fusionrec@champion, models:/fusionrec/3),
    downloaded into `dst`."""
    import mlflow

    setup()
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    # pyfunc stores the bundle under artifacts/<the logged folder's name>
    found = sorted((local / "artifacts").glob("*/bundle.json"))
    if not found:
        raise ValueError(f"{model_uri}: not a fusionrec model (no bundle.json in its artifacts)")
    return found[0].parent


@contextmanager
def local_bundle(model_uri: str) -> Iterator[Path]:
    """A local bundle folder for `model_uri`: a bundle path as it is, or a registered model
    `download`ed into a temporary folder that is removed on leaving the block."""
    if Path(model_uri).is_dir():
        yield Path(model_uri)
        return
    with tempfile.TemporaryDirectory(prefix="fusionrec-model-") as tmp:
        yield download(model_uri, Path(tmp))


MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points at now: `uri` names one fixed version (or a bundle folder)."""

    uri: str
    name: str | None
    version: str  # "local" for a bundle folder
    alias: str | None
    run_id: str | None


def resolve(model_uri: str) -> ModelRef:
    """Pin `model_uri` to a version: an alias is looked up now (it may move later)."""
    if Path(model_uri).is_dir():
        return ModelRef(str(Path(model_uri).resolve()), None, "local", None, None)
    match = MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(f"model URI {model_uri!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION "
                         "or a bundle folder")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup()
    name, alias = match["name"], match["alias"]
    try:
        if alias:
            found = MlflowClient().get_model_version_by_alias(name, alias)
        else:
            found = MlflowClient().get_model_version(name, match["version"])
    except MlflowException:
        raise ValueError(f"{model_uri}: no such registered model version in {tracking_uri()} "
                         "(train one with `fusionrec train --register`)") from None
    return ModelRef(f"models:/{name}/{found.version}", name, str(found.version), alias, found.run_id)


def run_metrics(run_id: str | None) -> dict[str, float]:
    """The final metrics of the run that trained a model ({} for a bundle folder)."""
    if run_id is None:
        return {}
    from mlflow import MlflowClient

    return dict(MlflowClient().get_run(run_id).data.metrics)


def training_runs(data_fingerprint: str, last: int) -> list:
    """The `last` newest training runs on the dataset with this fingerprint, newest first: runs of
    `fusionrec train` (and of the benchmarks that call it), not Ray Tune's trials or searches."""
    from mlflow import MlflowClient

    experiment_id = setup()
    found = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`{TAG}data` = '{data_fingerprint}'",
        order_by=["attributes.start_time DESC"], max_results=1000)
    trained = [r for r in found if "model.model" in r.data.params and "mlflow.parentRunId" not in r.data.tags
               and r.info.status == "FINISHED"]
    return trained[:last]


def promote(version: str, alias: str = CHAMPION) -> str | None:
    """Move `alias` to `version` of MODEL_NAME; returns the version it pointed at before (or None)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    setup()
    client = MlflowClient()
    try:
        client.get_model_version(MODEL_NAME, str(version))
    except MlflowException:
        raise ValueError(f"no version {version} of registered model {MODEL_NAME!r} in {tracking_uri()}") from None
    try:
        before = client.get_model_version_by_alias(MODEL_NAME, alias).version
    except MlflowException:
        before = None
    client.set_registered_model_alias(MODEL_NAME, alias, str(version))
    return None if before is None else str(before)
