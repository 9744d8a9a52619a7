"""A training job on `fusionrec cluster up --workers 2` survives the loss of a worker node mid-run:
once Ray Train has a checkpoint on record, the raylet of a worker node that holds one of the two
training workers is SIGKILLed (as a crash of that machine would stop it); the job still succeeds,
resumed from its last checkpoint on the nodes that are left, says so, and the cluster's tracking
server holds the result once. `fusionrec cluster down` then leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import FUSIONREC, ROOT, assert_down_left_nothing, fusionrec, registered_epoch, session_processes
from fusionrec.ops.cluster import alive_nodes

pytestmark = pytest.mark.integration

EPOCHS = 10
RESUMED = re.compile(r"training resumed from the checkpoint of epoch (\d+) after a worker failed")


def training_worker_pids(dashboard_url: str) -> list[int]:
    """The processes of the live Ray Train workers, from the dashboard's state API."""
    answer = requests.get(f"{dashboard_url}/api/v0/actors", timeout=10, params={
        "limit": 1000, "detail": "true", "filter_keys": "class_name", "filter_predicates": "=",
        "filter_values": "RayTrainWorker"}).json()
    return [actor["pid"] for actor in answer["data"]["result"]["result"] if actor["state"] == "ALIVE"]


def kill_raylet(node: dict) -> None:
    """SIGKILL the raylet of a node recorded in cluster.json: the one in the session its `ray start` leads."""
    raylets = [p for p in session_processes([node["pid"]]) if p.name() == "raylet"]
    assert len(raylets) == 1, raylets
    raylets[0].send_signal(signal.SIGKILL)


def test_a_training_job_survives_losing_a_worker_node(cluster_env, tiny_shop):
    # Ray Train's controller collects reports (and with them checkpoints) and checks its workers once
    # per health-check interval, 2 s by default; the nodes pass this on to the job's driver, and it
    # to the controller. A shorter one only makes the test quicker.
    cluster_env |= {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    home = Path(cluster_env["FUSIONREC_HOME"])
    up = fusionrec(cluster_env, "cluster", "up", "--workers", "2")  # 3 nodes of 1 CPU
    assert up.returncode == 0, up.stderr[-3000:]  # a failed up stops what it started and records nothing
    state = json.loads((home / "cluster.json").read_text())
    try:
        # 2 workers of 1 CPU each (cpus_each): on two of the three nodes, and so on one worker node at least
        job = subprocess.Popen(
            [*FUSIONREC, "job", "submit", "train", "--", str(tiny_shop), "--workers", "2", "--epochs", str(EPOCHS),
             "--register"], env=cluster_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline, on_record, lost = time.monotonic() + 240, None, None
            while lost is None:
                assert job.poll() is None, f"the job ended before a node was lost:\n{job.stdout.read()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint of epoch 1 on record within 240 s"
                on_record = registered_epoch(home / "ray_results")
                if on_record is not None and on_record >= 1:
                    nodes = {p["pid"]: p for p in state["processes"]}
                    hosts = [nodes.get(os.getsid(pid)) for pid in training_worker_pids(state["dashboard_url"])]
                    assert len(hosts) == 2 and all(hosts), hosts
                    lost = next(node for node in hosts if node["role"].startswith("worker-"))
                    kill_raylet(lost)
                time.sleep(0.2)
            output, _ = job.communicate(timeout=300)
        finally:
            if job.poll() is None:
                job.kill()
                job.communicate()
        assert job.returncode == 0 and "SUCCEEDED" in output, output[-5000:]
        # The rest ran on the head and the other worker node: the lost one stayed lost.
        assert len(alive_nodes(state["dashboard_url"])) == 2

        # Resumed from the checkpoint on record when the node went, or a later one; not from scratch.
        resumed = [int(epoch) for epoch in RESUMED.findall(output)]
        assert len(resumed) == 1, output[-5000:]
        epoch = resumed[0]
        assert on_record <= epoch < EPOCHS - 1, (on_record, epoch)

        from mlflow import MlflowClient

        client = MlflowClient(state["tracking_uri"])
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED", runs
        run_id = runs[0].info.run_id
        # Every epoch logged; those up to the checkpoint once (not redone), the later ones at most twice
        # (one logged before the node was lost but not yet checkpointed is run, and logged, again).
        logged = Counter(m.step for m in client.get_metric_history(run_id, "val_loss"))
        assert sorted(logged) == list(range(EPOCHS)), logged
        assert all(logged[e] == 1 for e in range(epoch + 1)) and max(logged.values()) <= 2, logged
        assert [m.value for m in client.get_metric_history(run_id, "resumed_from_epoch")] == [epoch]
        # The result once: the summary and test metrics, the logged model, the registered version.
        for name in ("val_mse", "best_epoch", "test_mse", "test_ndcg_at_5"):
            assert len(client.get_metric_history(run_id, name)) == 1, name
        assert len(client.search_logged_models(experiment_ids=experiments)) == 1
        versions = client.search_model_versions("name='fusionrec'")
        assert [(v.version, v.run_id) for v in versions] == [("1", run_id)]
    finally:
        down = fusionrec(cluster_env, "cluster", "down")
    assert_down_left_nothing(down, cluster_env, state)
