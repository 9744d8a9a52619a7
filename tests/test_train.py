"""Ray Train + MLflow end to end on the tiny shop: logging, registry aliases, evaluation, recovery."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import registered_epoch
from fusionrec.cli import app
from fusionrec.models.config import ModelConfig
from fusionrec.training.command import train
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import prepare
from fusionrec.training.ray_train import fit

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.integration]
runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def features(random_features):
    return random_features


def test_train_logs_to_mlflow_registers_and_evaluates(home, tiny_shop, features, tmp_path):
    from mlflow import MlflowClient

    config = TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=2, batch_size=64)
    first = train(config, register=True)
    assert list(first.metrics) == ["mse", "rmse", "precision@5", "ndcg@5", "users"]
    assert (first.promotion.version, first.promotion.promoted) == ("1", True)
    client = MlflowClient()
    run = client.get_run(first.run_id)
    assert run.data.params["model.model"] == "fusion" and run.data.params["epochs"] == "2"
    # The codebooks' decay that training used: the prior over the training part's ratings.
    assert float(run.data.params["code_l2"]) == pytest.approx(config.code_prior / int(run.data.params["train_ratings"]))
    assert {"val_mse", "test_mse", "test_precision_at_5"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(first.run_id, "train_loss")] == [0, 1]
    assert {a.path for a in client.list_artifacts(first.run_id)} >= {"loss_curve.png"}
    assert (home / "mlflow.db").is_file()
    assert client.get_run(first.run_id).info.artifact_uri.startswith((home / "mlartifacts").as_uri())

    # A clearly worse model (a learning rate that blows it up) is registered but does not take the alias.
    worse = train(TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=1, lr=50.0,
                              model=ModelConfig(model="dnn")), register=True)
    assert (worse.promotion.version, worse.promotion.promoted) == ("2", False)
    assert "does not beat version 1" in worse.promotion.reason
    assert str(client.get_model_version_by_alias("fusionrec", "champion").version) == "1"

    result = runner.invoke(app, ["evaluate", str(tiny_shop), "--model-uri", "models:/fusionrec@champion"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["protocol"] == "candidate" and out["mse"] == pytest.approx(first.metrics["mse"], rel=1e-5)
    result = runner.invoke(app, ["evaluate", str(tiny_shop), "--protocol", "full", "--k", "10"])
    assert result.exit_code == 0 and "recall@10" in result.stdout

    # Other ratings would re-draw another split, putting trained-on rows in "test": refused in one line.
    import shutil

    changed = tmp_path / "changed-shop"
    shutil.copytree(tiny_shop, changed)
    ratings = pd.read_parquet(changed / "ratings.parquet")
    ratings.loc[0, "rating"] = 6 - ratings.loc[0, "rating"]
    ratings.to_parquet(changed / "ratings.parquet", index=False)
    result = runner.invoke(app, ["evaluate", str(changed)])
    assert result.exit_code == 1 and "not the data this model was trained on" in result.stderr

    # `fusionrec runs`: both runs side by side, newest first, with their test metrics and the floor;
    # none on another dataset.
    result = runner.invoke(app, ["runs", str(tiny_shop)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| dnn", "| fusion (full)"]
    assert f"{first.metrics['mse']:.4f}" in rows[1] and f"{worse.metrics['mse']:.4f}" in rows[0]
    assert "Bayes floor" in result.stdout
    result = runner.invoke(app, ["runs", str(tiny_shop), "--last", "1"])
    assert result.stdout.count("| fusion") == 0 and result.stdout.count("| dnn") == 1
    result = runner.invoke(app, ["runs", str(changed)])
    assert result.exit_code == 1 and "no training runs on this dataset yet" in result.stderr

    # The registered model also loads as a plain MLflow pyfunc; unknown ids score as cold-start.
    import mlflow.pyfunc

    pyfunc = mlflow.pyfunc.load_model("models:/fusionrec@champion")
    scores = pyfunc.predict(pd.DataFrame({"user_id": ["u00001", "nobody"], "item_id": ["i00001", "i00002"]}))
    assert scores.shape == (2,) and ((scores >= 1) & (scores <= 5)).all()


def _training_worker_pid() -> int | None:
    """The process of the one live Ray Train worker. (`ray.util.state.list_actors` asks the
    dashboard, which the test cluster runs without; this reads the same actor table from the GCS.)"""
    from ray._private.state import actors

    pids = [actor["Pid"] for actor in actors(actor_state_name="ALIVE").values()
            if actor["ActorClassName"] == "RayTrainWorker"]
    return pids[0] if len(pids) == 1 else None


class WorkerKillingTracker(ThreadingHTTPServer):
    """A loopback MLflow tracking endpoint for the training worker (its `mlflow_target`). It passes
    log-metric calls on to the test's MLflow store, except the worker's first one for `epoch`: the
    worker makes it when that epoch's training is done, just before it reports the epoch and its
    checkpoint. That call is held, and the worker SIGKILLed from here as soon as the checkpoint of
    the epoch before is on record: it dies inside `epoch`, however fast or slow the machine is."""

    daemon_threads = True

    def __init__(self, store_uri: str, epoch: int, storage: Path):
        super().__init__(("127.0.0.1", 0), _TrackerHandler)
        self.store_uri, self.epoch, self.storage = store_uri, epoch, storage
        self.uri = f"http://127.0.0.1:{self.server_port}"
        self.killed_pid: int | None = None
        self.error: BaseException | None = None

    def kill_worker(self) -> None:
        deadline = time.monotonic() + 120
        # Epoch `epoch` cannot be reported while its logging is held: this waits for the one before.
        while registered_epoch(self.storage) != self.epoch - 1 or (pid := _training_worker_pid()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"epoch {self.epoch - 1}'s checkpoint not on record after 120 s")
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        self.killed_pid = pid


class _TrackerHandler(BaseHTTPRequestHandler):
    server: WorkerKillingTracker

    def do_POST(self) -> None:
        from mlflow import MlflowClient

        if not self.path.endswith("/runs/log-metric"):
            self.send_error(404)
            return
        metric = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if int(metric.get("step", 0)) == self.server.epoch and self.server.killed_pid is None:
            try:
                self.server.kill_worker()
                return  # nobody is left to answer
            except BaseException as error:  # noqa: BLE001 - the test fails on it; the run goes on
                self.server.error = error
        MlflowClient(self.server.store_uri).log_metric(metric["run_id"], metric["key"], float(metric["value"]),
                                                       int(metric["timestamp"]), int(metric.get("step", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args) -> None:  # no access log on stderr
        pass


def test_lost_worker_resumes_from_checkpoint(home, tiny_shop, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from fusionrec import registry

    # Ray Train's controller collects reports (and so checkpoints) once per health-check interval,
    # 2 s by default; it reads this variable, which Ray Train passes on from the driver.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    config = TrainConfig(dataset=str(tiny_shop), epochs=3, batch_size=64, model=ModelConfig(model="svd"))
    prepared = prepare(config)
    registry.setup()
    tracker = WorkerKillingTracker(registry.tracking_uri(), epoch=1, storage=tmp_path / "crashed")
    threading.Thread(target=tracker.serve_forever, name="tracker", daemon=True).start()
    runs = {}
    try:
        for name, uri in (("clean", registry.tracking_uri()), ("crashed", tracker.uri)):
            with mlflow.start_run() as run:
                _, saved = fit(config, prepared, tmp_path / name, {"uri": uri, "run_id": run.info.run_id})
            steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")]
            adam_steps = max(int(state["step"]) for state in saved["optimizer"]["state"].values())
            runs[name] = {"saved": saved, "steps": sorted(steps), "adam_steps": adam_steps}
    finally:
        tracker.shutdown()
        tracker.server_close()
    # The worker really died, killed from here inside epoch 1 (after epoch 0's checkpoint was on record).
    assert tracker.error is None and tracker.killed_pid, tracker.error
    clean, resumed = runs["clean"], runs["crashed"]
    # The epoch counter was restored: epoch 0 ran once (a restart from scratch would log it twice).
    assert clean["steps"] == resumed["steps"] == [0, 1, 2]
    # The optimizer state was restored: Adam counted every step of all three epochs, as without a crash.
    assert resumed["adam_steps"] == clean["adam_steps"] == 3 * math.ceil(len(prepared.split.train) / 64)
    assert clean["saved"]["epoch"] == resumed["saved"]["epoch"] == 2
    assert resumed["saved"]["best"]["value"] == pytest.approx(clean["saved"]["best"]["value"], rel=0.1)


def test_cli_train_prints_metrics_and_the_bayes_floor(home, tiny_shop):
    from mlflow import MlflowClient

    result = runner.invoke(app, ["train", str(tiny_shop), "--model", "svd", "--epochs", "1", "--train-seed", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"mse", "rmse", "precision@5", "ndcg@5", "users"}
    assert "vs the Bayes floor" in result.stderr
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("fusionrec").experiment_id])[0]
    assert (run.data.params["seed"], run.data.params["train_seed"]) == ("0", "2")


def test_cli_train_rejects_bad_options(home, tiny_shop):
    result = runner.invoke(app, ["train", str(tiny_shop), "--model", "bert4rec"])
    assert result.exit_code == 1 and "unknown model 'bert4rec'" in result.stderr
    result = runner.invoke(app, ["train", str(tiny_shop), "--split", "weird"])
    assert result.exit_code == 1 and "unknown split 'weird'" in result.stderr
    result = runner.invoke(app, ["train", str(tiny_shop), "--id-l2", "-1"])
    assert result.exit_code == 1 and "id_l2 must be non-negative, got -1.0" in result.stderr
    result = runner.invoke(app, ["train", str(tiny_shop), "--code-prior", "-0.5"])
    assert result.exit_code == 1 and "code_prior must be non-negative, got -0.5" in result.stderr


def test_id_l2_and_code_prior_default_per_objective():
    from fusionrec.training.config import CODE_PRIOR, ID_L2

    assert TrainConfig(dataset="d").code_prior == CODE_PRIOR["rating"] > 0  # the codebooks decay on ratings only
    assert TrainConfig(dataset="d", objective="implicit").code_prior == CODE_PRIOR["implicit"] == 0
    assert TrainConfig(dataset="d", objective="implicit", code_prior=10.0).code_prior == 10.0
    # A fixed prior against a mean loss: the decay falls as the training part grows.
    assert TrainConfig(dataset="d").code_l2(35_000) == pytest.approx(1e-3)
    assert TrainConfig(dataset="d").code_l2(3_500) == pytest.approx(1e-2)

    assert TrainConfig(dataset="d").id_l2 == ID_L2["rating"] == 3e-2  # the rating objective is unchanged
    assert TrainConfig(dataset="d", objective="implicit").id_l2 == ID_L2["implicit"] < 1e-3
    assert TrainConfig(dataset="d", objective="implicit", id_l2=0.5).id_l2 == 0.5
    with pytest.raises(ValueError, match="id_l2"):
        TrainConfig(dataset="d", id_l2=-1.0).check()


def test_stratified_implicit_run_evaluates_under_the_full_protocol(home, tiny_shop):
    from fusionrec.evaluate import evaluate_bundle
    from fusionrec.registry import local_bundle

    result = train(TrainConfig(dataset=str(tiny_shop), epochs=1, batch_size=64, split="stratified",
                               objective="implicit", model=ModelConfig(model="neumf")))
    assert result.metrics["mse"] is None and result.model_uri
    # selected on validation nDCG@10 over full ranking, recorded under that name (not as an "MSE")
    from mlflow import MlflowClient

    run = MlflowClient().get_run(result.run_id)
    assert result.selection[0] == "val_ndcg_at_10" and 0 <= result.selection[1] <= 1
    assert run.data.tags["fusionrec.selection_metric"] == "val_ndcg_at_10" and "val_mse" not in run.data.metrics
    assert run.data.metrics["val_ndcg_at_10"] == pytest.approx(result.selection[1])
    with local_bundle(result.model_uri) as folder:
        out = evaluate_bundle(tiny_shop, folder, "full", 10)
    assert {"ndcg@10", "precision@10", "recall@10", "map@10", "map_all@10"} <= set(out)
    assert 0 <= out["map_all@10"] <= out["map@10"] <= 1 and out["users"] > 0


def test_epoch_progress_follows_the_logged_epochs(home, capsys):
    import mlflow

    from fusionrec import registry
    from fusionrec.training.tracking import EpochProgress, log_resume

    registry.setup()
    with mlflow.start_run() as run:
        with EpochProgress(run.info.run_id, epochs=5, every_s=0.05) as progress:
            for epoch, loss in enumerate([0.9, 0.8, 0.85]):
                mlflow.log_metric("val_loss", loss, step=epoch)
            log_resume({"uri": registry.tracking_uri(), "run_id": run.info.run_id}, 0)  # a worker failed
            mlflow.log_metric("val_loss", 0.7, step=1)  # the resumed run logs epoch 1 again
            time.sleep(0.2)  # seen while running, told once
    assert progress.bar.n == 3 and not progress.thread.is_alive()
    told = capsys.readouterr().err.splitlines()
    assert told.count("training resumed from the checkpoint of epoch 0 after a worker failed") == 1, told


def test_a_split_without_validation_is_refused_never_replaced_by_test(tmp_path):
    from conftest import make_dataset

    # Every user has at most two ratings: leave-one-out has a test rating but no validation one.
    shop = make_dataset(tmp_path / "two-each")
    with pytest.raises(ValueError, match="leaves no validation ratings to select on"):
        prepare(TrainConfig(dataset=str(shop), split="loo"))


def test_leave_one_out_run_scores_under_the_ncf_protocol(home, tiny_shop):
    from fusionrec.evaluate import ncf

    config = TrainConfig(dataset=str(tiny_shop), epochs=1, batch_size=64, split="loo", objective="implicit",
                         model=ModelConfig(model="neumf"))
    prepared = prepare(config)
    model, _ = fit(config, prepared, home / "loo")
    test = prepared.part("test")
    # the tiny shop has 40 items: rank each held-out item against 10 never-rated ones, not 99
    out = ncf(model, prepared.ratings, test, prepared.items.n, k=5, negatives=10)
    assert out["users"] == len(test) == (prepared.ratings.groupby("user_id").size() >= 2).sum()  # one each
    assert 0 <= out["ndcg@5"] <= out["hr@5"] <= 1


def _same_split(a, b) -> bool:
    return all(np.array_equal(getattr(a, part), getattr(b, part)) for part in ("train", "validation", "test"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_a_training_seed_trains_the_same_split_again_on_ray_train(home, tiny_shop, features):
    """--seed draws the split, --train-seed the training (the initialisation, the batch order):
    another training seed keeps the split and trains other weights."""
    first = TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=1, batch_size=64)
    again = replace(first, train_seed=1)
    runs = {cfg.training_seed: (prepare(cfg), cfg) for cfg in (first, again)}
    models = {seed: fit(cfg, prepared, home / f"train-{seed}")[0] for seed, (prepared, cfg) in runs.items()}
    assert _same_split(runs[0][0].split, runs[1][0].split)
    assert not _same_weights(models[0], models[1])


def test_without_a_training_seed_the_split_seed_trains_and_validation_is_the_splits(home, tiny_shop, features):
    """In a trial (fit_in_trial): no --train-seed trains exactly as --train-seed equal to --seed, another
    trains other weights, and the validation negatives (implicit objective) stay the split's, so
    runs on one split are selected on one validation set."""
    from fusionrec.search.trial import fit_in_trial
    from fusionrec.training.data import loop_data
    from fusionrec.training.engine import validate

    base = TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=1, batch_size=64, seed=3,
                       objective="implicit")
    prepared = prepare(base)
    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)
    models = {name: fit_in_trial(cfg, data, threads=1, device=torch.device("cpu"))[0]
              for name, cfg in (("none", base), ("same", replace(base, train_seed=3)),
                                ("other", replace(base, train_seed=4)))}
    assert _same_weights(models["none"], models["same"])
    assert not _same_weights(models["none"], models["other"])
    cpu = torch.device("cpu")
    assert validate(models["other"], data, base, cpu) == validate(models["other"], data, replace(base, train_seed=4),
                                                                  cpu)


def test_cold_start_run_end_to_end(home, tiny_shop, features):
    result = train(TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=2, batch_size=64,
                               split="cold-start"))
    assert result.metrics["users"] > 0 and 0 < result.metrics["mse"] < 10


def test_two_worker_ddp_training(home, tiny_shop, features):
    from mlflow import MlflowClient

    result = train(TrainConfig(dataset=str(tiny_shop), features=str(features), epochs=2, batch_size=32, workers=2))
    assert 0 < result.metrics["mse"] < 10
    # Both workers reported a checksum of their weights after each epoch (two ranks, no more), each
    # trained on its own shard of the ratings: DDP kept them identical, and they moved from epoch to epoch.
    client = MlflowClient()
    logged = {name for name in client.get_run(result.run_id).data.metrics if name.startswith("param_checksum")}
    assert logged == {"param_checksum_rank0", "param_checksum_rank1"}
    rank0, rank1 = ([(m.step, m.value) for m in sorted(client.get_metric_history(result.run_id, name),
                                                       key=lambda m: m.step)] for name in sorted(logged))
    assert [step for step, _ in rank0] == [0, 1] and rank0 == rank1
    assert rank0[0][1] != rank0[1][1]
