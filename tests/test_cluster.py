"""A local two-node Ray cluster: both nodes join, tasks run on each, and stopping it leaves no Ray behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fusionrec.cluster import LocalCluster

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
