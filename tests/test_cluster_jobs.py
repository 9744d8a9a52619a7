"""`fusionrec cluster up` -> `fusionrec job submit` encode and train, then tune (its trials on both
nodes) -> the cluster's tracking server holds the runs and the registered version -> `fusionrec
serve` on the cluster answers -> `fusionrec cluster down` leaves none of its processes behind.
Every step is the command a user types, run in a subprocess (this test session may have a local Ray
of its own)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import requests

from conftest import FUSIONREC, ROOT, assert_down_left_nothing, fusionrec, port_holders

pytestmark = pytest.mark.integration


def test_cluster_jobs_tracking_serve_and_down(cluster_env, tiny_shop, tiny_models, tmp_path, free_port):
    up = fusionrec(cluster_env, "cluster", "up", "--workers", "1", "--cpus-per-node", "1")
    assert up.returncode == 0, up.stderr[-3000:]  # a failed up stops what it started and records nothing
    state = json.loads((Path(cluster_env["FUSIONREC_HOME"]) / "cluster.json").read_text())
    try:
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        assert exports == {"RAY_ADDRESS": state["address"], "MLFLOW_TRACKING_URI": state["tracking_uri"]}
        assert state["tracking_uri"].startswith("http://127.0.0.1:") and len(state["processes"]) == 3

        # Both jobs at once (2 CPUs: an encoder actor and a training worker); train does not need the features.
        features = tmp_path / "features"
        encode = subprocess.Popen(
            [*FUSIONREC, "job", "submit", "encode", "--", str(tiny_shop), "--out", str(features),
             "--text-model", str(tiny_models["bert"]), "--image-model", str(tiny_models["dinov2"]), "--actors", "1"],
            env=cluster_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        train = fusionrec(cluster_env, "job", "submit", "train", "--", str(tiny_shop), "--epochs", "2", "--register",
                          timeout=400)
        encoded, _ = encode.communicate(timeout=400)
        assert encode.returncode == 0 and "SUCCEEDED" in encoded, encoded[-3000:]
        assert (features / "items.text.parquet").is_file() and "items.image: 40 of 40 re-encoded" in encoded
        assert train.returncode == 0 and "SUCCEEDED" in train.stderr, (train.stdout + train.stderr)[-3000:]
        assert '{"mse": ' in train.stdout  # the job's own output, streamed

        # A search's trials spread over the nodes: two at once, one CPU each, so one per node. (Trials
        # of 40 epochs, some seconds: Tune reuses a finished trial's actor, on its node, for the next
        # trial, so trials shorter than a new actor's start on the other node would all run on one.)
        tuned = fusionrec(cluster_env, "job", "submit", "tune", "--", str(tiny_shop), "--features", str(features),
                          "--space", "tune/widths.yaml", "--trials", "4", "--epochs", "40", "--no-early-stopping",
                          "--confirm-seeds", "0", timeout=400)
        assert tuned.returncode == 0 and "SUCCEEDED" in tuned.stderr, (tuned.stdout + tuned.stderr)[-3000:]

        # Any cluster by RAY_ADDRESS: the job API at the dashboard's address
        listed = fusionrec(cluster_env | {"RAY_ADDRESS": state["dashboard_url"]}, "job", "list")
        assert listed.returncode == 0 and listed.stdout.count("SUCCEEDED") == 3, listed.stdout + listed.stderr

        from mlflow import MlflowClient

        client = MlflowClient(state["tracking_uri"])
        search = client.search_runs([client.get_experiment_by_name("fusionrec").experiment_id],
                                    "tags.mlflow.runName = 'tune widths'")[0]
        trials = client.search_runs([search.info.experiment_id], f"tags.mlflow.parentRunId = '{search.info.run_id}'")
        assert len(trials) == 4 and len({t.data.tags["fusionrec.node_id"] for t in trials}) == 2, [
            (t.info.start_time, t.data.tags["fusionrec.node_id"][:8]) for t in trials]
        champion = client.get_model_version_by_alias("fusionrec", "champion")
        run = client.get_run(champion.run_id)
        assert run.info.status == "FINISHED" and "val_mse" in run.data.metrics

        serve_port = free_port()
        served = subprocess.Popen([*FUSIONREC, "serve", "--port", str(serve_port)],
                                  env=cluster_env | exports, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{serve_port}"
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and served.poll() is None:
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass  # not listening yet, or busy starting
                time.sleep(1)
            assert served.poll() is None, served.stdout.read()[-3000:]
            assert port_holders(url) == {"haproxy"}  # `cluster up` starts its nodes to serve behind HAProxy
            user = pd.read_parquet(tiny_shop / "ratings.parquet")["user_id"].iloc[0]
            answer = requests.post(f"{url}/recommend", json={"user_id": user, "k": 3}, timeout=60)
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["items"]) == 3 and answer.json()["model_version"] == champion.version
            status = fusionrec(cluster_env, "cluster", "status")
            assert status.returncode == 0, status.stderr
            assert "2 nodes" in status.stdout and "2 CPUs" in status.stdout, status.stdout
            assert "serve: fusionrec RUNNING" in status.stdout and "tracking server: http" in status.stdout
        finally:
            served.send_signal(signal.SIGINT)
            served.communicate(timeout=120)
    finally:
        down = fusionrec(cluster_env, "cluster", "down")
    assert_down_left_nothing(down, cluster_env, state)
