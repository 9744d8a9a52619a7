"""Autoscaling as shipped: `fusionrec serve` with serve/config.yaml in its own process on the
session's Ray, open-loop load at a fixed arrival rate from another process. The ranker goes from
its minimum to two or more replicas under load and back when the load stops; every request is
answered through the scale-out and the scale-in, and a killed replica costs only the requests it
was holding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import fusionrec_serve, kill_one_ranker, port_holders

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.integration]

CONFIG = Path("serve/config.yaml")
RATE = 80  # requests per second: one ranker replica alone would be always busy, over its target of 1 ongoing
LOAD_S = 25
KILL_TAKES_S = 0.5  # from ray.kill() returning to the replica's process being gone
FAILS_WITHIN_S = 5  # a request the killed replica held has failed this long after its process is gone


def ranker_replicas() -> int:
    from fusionrec.serve.app import running_replicas

    return running_replicas("Ranker")


@pytest.fixture
def served(registered):
    """`fusionrec serve --config serve/config.yaml` joined to this session's Ray; stopped with Ctrl-C."""
    import ray

    with fusionrec_serve(["--config", str(CONFIG)],
                         {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}) as url:
        yield url


def test_the_ranker_scales_out_under_load_and_back_and_a_kill_costs_only_what_it_held(served, served_bundles, tmp_path):
    ranker = next(d for d in yaml.safe_load(CONFIG.read_text())["applications"][0]["deployments"]
                  if d["name"] == "Ranker")
    scaling = ranker["autoscaling_config"]
    assert ranker_replicas() == scaling["min_replicas"] == 1
    assert port_holders(served) == {"haproxy"}  # fusionrec's local Ray serves behind HAProxy by default

    users = served_bundles["ratings"]["user_id"].unique()[:20]
    items = sorted(served_bundles["ratings"]["item_id"].unique())[:5]
    mix = [["/recommend", {"user_id": u, "k": 5}] for u in users] + [["/predict", {"user_id": users[0],
                                                                                  "item_ids": items}]]
    (tmp_path / "requests.json").write_text(json.dumps(mix))
    load = subprocess.Popen([sys.executable, "benchmarks/open_loop.py", served, "--requests",
                             str(tmp_path / "requests.json"), "--rate", str(RATE), "--seconds", str(LOAD_S),
                             "--out", str(tmp_path / "rows.json")], stdout=subprocess.PIPE, text=True)
    timeline, killed = [], None  # (time.monotonic(), RUNNING ranker replicas); (from, to) around the kill
    while load.poll() is None:
        timeline.append((time.monotonic(), ranker_replicas()))
        if killed is None and timeline[-1][1] >= 2:
            before = time.monotonic()
            kill_one_ranker()
            killed = (before, time.monotonic() + KILL_TAKES_S)
        time.sleep(0.5)
    summary = json.loads(load.stdout.read().splitlines()[-1])
    rows = json.loads((tmp_path / "rows.json").read_text())
    sent = summary["started_at"]  # the load's schedule on this process's clock

    assert max(n for _, n in timeline) >= 2, timeline
    assert killed is not None and summary["requests"] == RATE * LOAD_S
    # One hop: a request is in the killed replica's process, and dies with it. HAProxy has sent it
    # on, so it cannot retry it: it closes the client's connection or answers 500 (so does Serve's
    # Python proxy). The replica holds every request HAProxy sent it, queued past
    # max_ongoing_requests, so on a slow machine that can be hundreds (239 in one run). They fail
    # when it dies, not later. Nothing else may fail: not a request routed after the kill, nor one
    # left hanging.
    failed = [(at, latency, status) for at, latency, status in rows if not 200 <= status < 300]
    held = [(at, latency, status) for at, latency, status in failed
            if sent + at <= killed[1] and killed[0] <= sent + at + latency <= killed[1] + FAILS_WITHIN_S
            and (status == 0 or status >= 500)]
    window = (round(killed[0] - sent, 2), round(killed[1] - sent, 2))  # on the schedule's clock, as the rows
    assert failed == held, (f"kill from {window[0]} to {window[1]} s; {len(held)} held by the killed replica; "
                            f"other failures [scheduled s, latency s, status]: {[r for r in failed if r not in held]}; "
                            f"replicas {[(round(t - sent, 1), n) for t, n in timeline]}; {summary}")

    deadline = time.monotonic() + scaling["downscale_delay_s"] + 45
    while ranker_replicas() > scaling["min_replicas"] and time.monotonic() < deadline:
        time.sleep(1)
    assert ranker_replicas() == scaling["min_replicas"], "the ranker did not return to its minimum"
