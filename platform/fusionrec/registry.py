"""MLflow: where runs are tracked and the registered model `fusionrec` lives.

Tracking defaults to a SQLite file in the state folder ($FUSIONREC_HOME or ./.fusionrec), with
artifacts beside it; any MLFLOW_TRACKING_URI (a tracking server) works the same. The served
model is the registered version carrying alias `champion`; promotion moves the alias.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fusionrec.config import state_folder

MODEL_NAME = "fusionrec"
CHAMPION = "champion"
EXPERIMENT = "fusionrec"
SELECTION_METRIC = "val_mse"
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

            users = {u: k for k, u in enumerate(self.meta["users"]["ids"])}
            items = {i: k for k, i in enumerate(self.meta["items"]["ids"])}
            u = model_input["user_id"].astype(str).map(lambda x: users.get(x, len(users))).to_numpy()
            i = model_input["item_id"].astype(str).map(lambda x: items.get(x, len(items))).to_numpy()
            scale = tuple(self.meta["rating_scale"]) if self.meta["objective"] == "rating" else None
            return predict(self.model, u, i, scale)

    return BundleModel


def log_bundle(folder: Path) -> str:
    """Log a model bundle (see models/bundle.py) as the active run's pyfunc model; returns its URI."""
    import mlflow.pyfunc

    info = mlflow.pyfunc.log_model(name="model", python_model=_pyfunc_class()(), artifacts={"bundle": str(folder)},
                                   pip_requirements=["fusionrec"])
    return info.model_uri


def champion_metric() -> tuple[str, float] | None:
    """(version, validation MSE) of the current champion, or None if there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException:
        return None
    value = client.get_run(version.run_id).data.metrics.get(SELECTION_METRIC)
    return version.version, float("inf") if value is None else value


def register(model_uri: str, val_mse: float) -> tuple[str, bool]:
    """Register a logged model under MODEL_NAME; move `champion` to it only if it beats the
    current champion on validation MSE (or there is none). Returns (version, promoted)."""
    import mlflow
    from mlflow import MlflowClient

    version = mlflow.register_model(model_uri, MODEL_NAME).version
    current = champion_metric()
    promoted = current is None or val_mse < current[1]
    if promoted:
        MlflowClient().set_registered_model_alias(MODEL_NAME, CHAMPION, version)
    return str(version), promoted


def download(model_uri: str, dst: Path | None = None) -> Path:
    """A local bundle folder for `model_uri`: models:/fusionrec@champion, models:/fusionrec/3, or a bundle path.
    Downloads go to `dst` (default: a new temporary folder)."""
    if Path(model_uri).is_dir():
        return Path(model_uri)
    import mlflow

    setup()
    dst = dst or Path(tempfile.mkdtemp(prefix="fusionrec-model-"))
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    # pyfunc stores the bundle under artifacts/<the logged folder's name>
    found = sorted((local / "artifacts").glob("*/bundle.json"))
    if not found:
        raise ValueError(f"{model_uri}: not a fusionrec model (no bundle.json in its artifacts)")
    return found[0].parent


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
