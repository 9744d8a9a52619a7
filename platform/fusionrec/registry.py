"""MLflow: where runs are tracked and the registered model `fusionrec` lives.

Tracking defaults to a SQLite file in the state folder ($FUSIONREC_HOME or ./.fusionrec), with
artifacts beside it; any MLFLOW_TRACKING_URI (a tracking server) works the same. The served
model is the registered version carrying alias `champion`; promotion moves the alias.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fusionrec.config import state_folder

MODEL_NAME = "fusionrec"
CHAMPION = "champion"
EXPERIMENT = "fusionrec"
SELECTION_METRIC = "val_mse"


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


def download(model_uri: str) -> Path:
    """A local bundle folder for `model_uri`: models:/fusionrec@champion, models:/fusionrec/3, or a bundle path."""
    if Path(model_uri).is_dir():
        return Path(model_uri)
    import mlflow

    setup()
    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=tempfile.mkdtemp(prefix="fusionrec-model-"))
    return Path(local) / "artifacts" / "bundle"
