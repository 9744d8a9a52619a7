"""A local two-node Ray cluster: both nodes join, tasks run on each, and stopping it leaves no Ray behind;
`fusionrec cluster up` that fails, or is killed, leaves nothing behind either."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import session_processes
from fusionrec.cli import app
from fusionrec.ops.cluster import LocalCluster
from fusionrec.ops.processes import spawn, stop_processes

pytestmark = pytest.mark.integration

# Run in a child process: this test session already has its own local Ray.
PROBE = """
import ray
ray.init(address={address!r}, log_to_driver=False)
assert len([n for n in ray.nodes() if n["Alive"]]) == 2, ray.nodes()
@ray.remote(num_cpus=1)
def where():
    import time
    time.sleep(1)  # each task holds its node's only CPU for a while: the others must go to the other node
    return ray.get_runtime_context().get_node_id()
nodes = set(ray.get([where.remote() for _ in range(4)]))
assert len(nodes) == 2, nodes
print(ray.cluster_resources()["CPU"])
"""


def test_two_nodes_join_run_tasks_and_stop_cleanly():
    cluster = LocalCluster(nodes=2, cpus_per_node=1)
    with cluster as address:
        out = subprocess.run([sys.executable, "-c", PROBE.format(address=address)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().endswith("2.0")
        port = address.rsplit(":", 1)[1]
        temp_dir = cluster.temp_dir
    left = subprocess.run(["pgrep", "-f", f"gcs_server.*{port}|--address={address}"], capture_output=True, text=True)
    assert left.stdout.strip() == ""
    assert not temp_dir.exists()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one node"):
        LocalCluster(nodes=0)


@pytest.fixture
def home(monkeypatch, tmp_path):
    """A state folder of the test's own; no cluster or tracking server inherited from outside. Whatever
    a failing test leaves recorded is stopped: other clusters share this machine."""
    from fusionrec.ops.cluster import down

    monkeypatch.setenv("FUSIONREC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield tmp_path / "home"
    down()


def test_a_failed_up_names_the_process_and_stops_everything_it_started(monkeypatch, home):
    """The worker's `ray start` refuses an option: `cluster up` fails naming it, its command and its
    log's last lines, and none of what it started (the server, the head and theirs) is left."""
    from fusionrec.ops import cluster

    started, before_worker = [], []
    real_spawn = cluster.spawn

    def spawn(role, command, env, log):
        if role == "worker-1":
            command = [*command, "--no-such-option"]
            before_worker.extend(session_processes([p.pid for p in started]))  # the head is up: its raylet, GCS...
        started.append(real_spawn(role, command, env, log))
        return started[-1]

    monkeypatch.setattr(cluster, "spawn", spawn)
    result = CliRunner().invoke(app, ["cluster", "up", "--workers", "1"])
    assert result.exit_code == 1, result.output
    first, *details = result.output.strip().splitlines()
    assert first.startswith("error: Ray worker node 1 exited while the cluster was starting (exit code 2); "
                            f"log: {home / 'cluster-logs' / 'worker-1.log'}"), first
    assert all(line.startswith("  ") for line in details), details  # under the one line, indented
    assert details[0].startswith("  command: ") and details[0].endswith("--no-such-option")
    assert any("No such option" in line for line in details[1:]), details
    assert [p.role for p in started] == ["tracking", "head", "worker-1"]
    assert len(before_worker) > 3  # the server's workers, the head's GCS, raylet, dashboard...
    assert [p for p in before_worker + session_processes([p.pid for p in started]) if p.is_running()] == []
    assert not (home / "cluster.json").exists()


def test_down_stops_an_up_that_was_killed_while_starting(home):
    """`cluster up` killed (no chance to clean up) once the head is starting: the record it leaves
    says so, `cluster status` refuses it, and `cluster down` stops all it had started."""
    import psutil

    up = subprocess.Popen([str(Path(sys.executable).parent / "fusionrec"), "cluster", "up", "--workers", "0"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record, state = home / "cluster.json", {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None:
            state = json.loads(record.read_text()) if record.is_file() else {"processes": []}
            head = [p["pid"] for p in state["processes"] if p["role"] == "head"]
            if head and len(session_processes(head)) > 2:  # the head's `ray start` has started its GCS
                break
            time.sleep(0.2)
    finally:
        up.kill()
        up.wait()
    assert state["starting"] and [p["role"] for p in state["processes"]] == ["tracking", "head"], state
    left = session_processes([p["pid"] for p in state["processes"]])
    assert all(p.is_running() for p in left)

    status = CliRunner().invoke(app, ["cluster", "status"])
    assert status.output.startswith("no cluster: the one recorded is starting, or its start was interrupted")
    down = CliRunner().invoke(app, ["cluster", "down"])
    assert down.exit_code == 0 and down.output.startswith("cluster down:"), down.output
    psutil.wait_procs(left, timeout=10)
    assert [p for p in left if p.is_running()] == []
    assert not record.exists() and not Path(state["temp_dir"]).exists()


def test_stopping_a_process_that_exited_stops_what_it_left_in_its_session():
    """A `ray start` that dies can leave its node's processes behind, in its session."""
    leader = spawn("head", ["sh", "-c", "sleep 300 & exit 0"], os.environ.copy(), None)
    deadline = time.monotonic() + 10
    while leader.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    orphans = [p for p in session_processes([leader.pid]) if p.pid != leader.pid]
    assert not leader.alive() and len(orphans) == 1
    assert stop_processes([leader]) == 1
    assert not orphans[0].is_running()
