"""A local multi-node Ray cluster on this machine: a head and worker nodes, each its own
`ray start --block` process, so that multi-node runs (DDP across nodes, the object store
between raylets) can be tried on one box. Stopping a node's process stops that node's Ray and
nothing else on the machine (unlike `ray stop`).

    with LocalCluster(nodes=2, cpus_per_node=1) as address:
        os.environ["RAY_ADDRESS"] = address   # ensure_ray() joins it
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 256 * 1024**2):
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("a local cluster needs at least one node and one CPU per node")
        self.nodes, self.cpus_per_node, self.object_store_bytes = nodes, cpus_per_node, object_store_bytes
        self.processes: list[subprocess.Popen] = []
        self.address: str | None = None

    def _start(self, *args: str) -> None:
        ray = Path(sys.executable).parent / "ray"
        # `ray start` turns token authentication on while a driver's default is off: the nodes of
        # this loopback-only dev cluster take the driver's default unless RAY_AUTH_MODE says otherwise.
        env = {"RAY_AUTH_MODE": "disabled", **os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_ADDRESS", None)
        self.processes.append(subprocess.Popen(
            [str(ray), "start", "--block", f"--num-cpus={self.cpus_per_node}",
             f"--object-store-memory={self.object_store_bytes}", *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def _wait_for(self, cpus: int, timeout_s: float = 120) -> None:
        """Until the cluster reports `cpus` CPUs (a fresh driver each try: resources are cached per connection)."""
        check = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False); "
                 f"raise SystemExit(0 if ray.cluster_resources().get('CPU', 0) >= {cpus} else 1)")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError("a Ray node of the local cluster exited while starting")
            if subprocess.run([sys.executable, "-c", check], capture_output=True).returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"the local cluster did not reach {cpus} CPUs within {timeout_s:.0f} s")

    def start(self) -> str:
        """Start the head and the workers; returns the cluster address (for RAY_ADDRESS)."""
        from ray._private.services import get_node_ip_address

        port = free_port()
        self.address = f"{get_node_ip_address()}:{port}"  # Ray binds the machine's address, not loopback
        self._start("--head", f"--port={port}", "--include-dashboard=false")
        self._wait_for(self.cpus_per_node)
        for _ in range(self.nodes - 1):
            self._start(f"--address={self.address}")
        self._wait_for(self.nodes * self.cpus_per_node)
        return self.address

    def stop(self) -> None:
        for process in reversed(self.processes):  # workers first, the head last
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()
        # `ray start` records the newest cluster for `ray.init()` to find; do not leave it pointing here
        current = Path("/tmp/ray/ray_current_cluster")
        if self.address and current.is_file() and current.read_text().strip() == self.address:
            current.unlink()

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
