"""A local multi-node Ray cluster on this machine: a head and worker nodes, each its own
`ray start --block` process in its own session, so that multi-node runs (DDP across nodes, the
object store between raylets, jobs, Serve) can be tried on one box. Stopping a node's session
stops that node's Ray and nothing else on the machine (unlike `ray stop`).

    with LocalCluster(nodes=2, cpus_per_node=1) as address:
        os.environ["RAY_ADDRESS"] = address   # ensure_ray() joins it

`fusionrec cluster up|status|down` runs the same nodes detached, beside an MLflow tracking server,
and records their processes in STATE/cluster.json as each starts, so that `down` (another process,
later) stops exactly those, even after an `up` that was interrupted. Token auth: every process
fusionrec starts or drives takes RAY_AUTH_MODE=disabled unless the environment says otherwise (see
ray_runtime.default_auth_mode), so nodes and clients agree.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fusionrec.config import state_folder
from fusionrec.ops.processes import Proc, exited, free_port, log_tail, spawn, start_failed, stop_processes
from fusionrec.ops.ray_runtime import default_auth_mode, serve_proxy_env

STATE_FILE = "cluster.json"


def _get_json(url: str, timeout_s: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # loopback only: the dashboard
        return json.loads(response.read())


def alive_nodes(dashboard_url: str) -> list[dict]:
    """The cluster's alive nodes from the dashboard's state API (node_ip, is_head_node, resources_total)."""
    answer = _get_json(f"{dashboard_url}/api/v0/nodes?limit=1000&filter_keys=state&filter_predicates=%3D"
                       "&filter_values=ALIVE")
    return answer["data"]["result"]["result"]


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node: this one, plus the auth mode, no usage stats, this venv's
    `python` first on PATH (job entrypoints say `python jobs/...`), `extra`, and Serve behind
    HAProxy where it is installed (ray_runtime.serve_proxy_env)."""
    env = {**os.environ, "RAY_AUTH_MODE": default_auth_mode(), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}
    env.pop("RAY_ADDRESS", None)
    return env | serve_proxy_env(env)


class LocalCluster:
    """A head (with the dashboard on 127.0.0.1, which the job API needs) and worker nodes, every
    port chosen free so that several clusters (and other local Rays) live side by side. Each node
    has a temp dir of its own: nodes sharing one would unpack a job's working_dir into the same
    folder, each replacing it under the others (a job's cwd vanishes mid-run)."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 256 * 1024**2,
                 env: dict[str, str] | None = None, log_dir: Path | None = None,
                 on_spawn: Callable[[], None] | None = None):
        if nodes < 1 or cpus_per_node < 1:
            raise ValueError("a local cluster needs at least one node and one CPU per node")
        self.nodes, self.cpus_per_node, self.object_store_bytes = nodes, cpus_per_node, object_store_bytes
        self.env, self.log_dir = node_env(env), log_dir
        self.on_spawn = on_spawn  # called as each node's process starts: `cluster up` records it at once
        self.processes: list[Proc] = []
        self.address: str | None = None
        self.dashboard_url: str | None = None
        self.temp_dir: Path | None = None

    def _start(self, role: str, *args: str) -> None:
        ray = Path(sys.executable).parent / "ray"
        self.processes.append(spawn(role, [
            str(ray), "start", "--block", f"--num-cpus={self.cpus_per_node}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={free_port()}",  # Ray's fixed default (52365) would clash
            f"--temp-dir={self.temp_dir / role}", *args],
            self.env, self._log(role)))
        if self.on_spawn:
            self.on_spawn()

    def _log(self, role: str) -> Path | None:
        return self.log_dir / f"{role}.log" if self.log_dir else None

    def _check_alive(self) -> None:
        """Fail now, naming the process, if one exited, or if a `ray start` logged its failure (it
        can linger after one: a raylet that took over Ray's fixed 30 s to register, a dashboard slow
        to start)."""
        for proc in self.processes:
            log = self._log(proc.role)
            if not proc.alive():
                raise exited(proc, log)
            if proc.role != "tracking" and log and log.is_file() and "Traceback" in log.read_text(errors="replace"):
                raise start_failed(proc, f"failed to start: {log_tail(log, 1)[0].strip()}", log)

    def _wait_for(self, nodes: int, timeout_s: float = 180) -> None:
        """Until the dashboard reports `nodes` alive nodes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if len(alive_nodes(self.dashboard_url)) >= nodes:
                    return
            except (OSError, ValueError, KeyError):
                pass  # the dashboard is not up yet
            time.sleep(1)
        raise RuntimeError(f"the local cluster did not reach {nodes} nodes within {timeout_s:.0f} s")

    def start(self) -> str:
        """Start the head and the workers; returns the cluster address (for RAY_ADDRESS)."""
        from ray._private.services import get_node_ip_address

        port, dashboard_port = free_port(), free_port()
        # short: Ray's unix sockets live under it (and `ray start` records the cluster here, not in /tmp/ray)
        self.temp_dir = Path(tempfile.gettempdir()) / f"fusionrec-ray-{port}"
        self.address = f"{get_node_ip_address()}:{port}"  # Ray binds the machine's address, not loopback
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._start("head", "--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}")
        self._wait_for(1)  # the head fully up first: a worker's raylet gets only 30 s to register with a busy GCS
        for n in range(1, self.nodes):
            self._start(f"worker-{n}", f"--address={self.address}")
        self._wait_for(self.nodes)
        return self.address

    def stop(self) -> None:
        stop_processes(self.processes)
        self.processes.clear()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> str:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ClusterState:
    """What `fusionrec cluster up` started, as recorded in STATE/cluster.json."""

    address: str  # RAY_ADDRESS: the GCS address (ray.init, the job API and `ray status` all take it)
    dashboard_url: str
    tracking_uri: str
    home: str  # the state folder every node and job uses (FUSIONREC_HOME)
    workers: int
    cpus_per_node: int
    logs: str
    temp_dir: str = ""  # the nodes' Ray temp dirs (sessions, sockets, unpacked jobs)
    processes: list[Proc] = field(default_factory=list)
    # True until `up` has every process running and answering: a record left so was interrupted
    # (or is still starting); `down` stops what it lists all the same
    starting: bool = False

    @staticmethod
    def path() -> Path:
        return state_folder() / STATE_FILE

    def save(self) -> None:
        """Temp-then-rename: a reader never sees half a file."""
        path = self.path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls) -> ClusterState | None:
        """The recorded cluster, or None if there is none (or the record is unreadable)."""
        try:
            raw = json.loads(cls.path().read_text())
            return cls(**{**raw, "processes": [Proc(**p) for p in raw["processes"]]})
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def alive(self) -> bool:
        return bool(self.processes) and all(p.alive() for p in self.processes)


def _wait_for_tracking(proc: Proc, uri: str, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise exited(proc, log)
        if tracking_health(uri) == "ok":
            return
        time.sleep(0.5)
    raise start_failed(proc, f"did not answer within {timeout_s:.0f} s", log)


def tracking_health(uri: str) -> str:
    """"ok" if the tracking server answers its health check, else why not."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
            return "ok" if response.read().strip() == b"OK" else "unhealthy"
    except OSError as exc:
        return f"not answering ({getattr(exc, 'reason', exc)})"


def up(workers: int = 1, cpus_per_node: int = 1, object_store_bytes: int = 256 * 1024**2) -> ClusterState:
    """Start a detached local cluster (a head, `workers` worker nodes) and an MLflow tracking
    server, recorded in STATE/cluster.json. The server's store is the state folder's own
    (mlflow.db, mlartifacts/), the one fusionrec uses without a server, so runs made before, on
    the cluster and locally afterwards all sit in one place."""
    if workers < 0:
        raise ValueError("--workers must be 0 or more")
    current = ClusterState.load()
    if current and current.alive():
        raise RuntimeError(("a cluster is starting, or its start was interrupted," if current.starting else
                            f"a cluster is already up at {current.address}") + " (`fusionrec cluster down` stops it)")
    if current:
        down()  # a stale record: whatever is left of it goes first
    home = state_folder()
    logs = home / "cluster-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    tracking_port = free_port()
    tracking_uri = f"http://127.0.0.1:{tracking_port}"
    state = ClusterState(address="", dashboard_url="", tracking_uri=tracking_uri, home=str(home), workers=workers,
                         cpus_per_node=cpus_per_node, logs=str(logs), starting=True)
    env = {"FUSIONREC_HOME": str(home), "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1"}
    mlflow = Path(sys.executable).parent / "mlflow"

    def record() -> None:
        """Save the record as each process starts: should this `up` be killed, `down` finds them all."""
        state.address, state.dashboard_url = cluster.address or "", cluster.dashboard_url or ""
        state.temp_dir = str(cluster.temp_dir or "")
        state.save()

    cluster = LocalCluster(nodes=1 + workers, cpus_per_node=cpus_per_node, object_store_bytes=object_store_bytes,
                           env=env, log_dir=logs, on_spawn=record)
    cluster.processes = state.processes  # one list: the record grows as nodes start
    try:
        state.processes.append(spawn("tracking", [
            str(mlflow), "server", "--host", "127.0.0.1", "--port", str(tracking_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(home / "mlartifacts")],
            node_env(env), logs / "tracking.log"))
        record()
        cluster.start()
        _wait_for_tracking(state.processes[0], tracking_uri, logs / "tracking.log")
        state.starting = False
        record()
    except BaseException:  # a failure, Ctrl-C: stop whatever started (the record lists it all)
        _stop(state)
        raise
    return state


def down() -> int | None:
    """Stop what `up` recorded (the nodes and the tracking server, all started or not) and forget
    it; returns how many processes were stopped, or None if no cluster was recorded."""
    state = ClusterState.load()
    if state is None:
        ClusterState.path().unlink(missing_ok=True)  # an unreadable record
        return None
    return _stop(state)


def _stop(state: ClusterState) -> int:
    # A cluster still starting has nothing to drain, and a `ray start` signalled mid-start can go
    # on waiting for its GCS (its SIGTERM handler's SystemExit is swallowed, seen under load): give
    # the nodes 10 s, not a minute, before their sessions are killed.
    stopped = stop_processes(state.processes, timeout_s=10 if state.starting else 60)
    if state.temp_dir:
        shutil.rmtree(state.temp_dir, ignore_errors=True)
    ClusterState.path().unlink(missing_ok=True)
    return stopped


@dataclass
class Target:
    """The cluster a command talks to: RAY_ADDRESS if set, else the one `fusionrec cluster up` recorded."""

    address: str
    local: ClusterState | None  # the recorded cluster, when that is the target


def target() -> Target:
    address = os.environ.get("RAY_ADDRESS")
    state = ClusterState.load()
    if address:
        same = state and state.alive() and address in (state.address, state.dashboard_url)
        return Target(address, state if same else None)
    if state is None:
        raise RuntimeError("no cluster: start one with `fusionrec cluster up` or set RAY_ADDRESS")
    if state.starting:
        raise RuntimeError("no cluster: the one recorded is starting, or its start was interrupted "
                           "(`fusionrec cluster down` stops it)")
    if not state.alive():
        raise RuntimeError(f"no cluster: the one recorded at {state.address} is not (fully) running "
                           "(`fusionrec cluster down` clears it)")
    return Target(state.address, state)


def job_client(tgt: Target):
    """A JobSubmissionClient for the target (the GCS address or the dashboard's http:// address)."""
    default_auth_mode()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(tgt.address)


def status(tgt: Target) -> list[str]:
    """Lines describing the target cluster: nodes and CPUs, running jobs, the Serve application,
    the tracking server."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = job_client(tgt)
    dashboard = client.get_address()
    nodes = alive_nodes(dashboard)
    cpus = sum(n["resources_total"].get("CPU", 0) for n in nodes)
    heads = sum(bool(n["is_head_node"]) for n in nodes)
    lines = [f"cluster {tgt.address} (dashboard {dashboard}): {len(nodes)} node{'s' * (len(nodes) != 1)} "
             f"({heads} head, {len(nodes) - heads} worker{'s' * (len(nodes) - heads != 1)}), {cpus:g} CPUs"]
    running = [j for j in client.list_jobs() if not j.status.is_terminal()]
    lines.append(f"jobs: {len(running)} running" + "".join(  # drivers (e.g. `fusionrec serve`) count too
        f"\n  {j.submission_id or f'driver {j.job_id}'} {j.status.value}: {j.entrypoint}" for j in running))
    serve = ServeSubmissionClient(dashboard).get_serve_details()
    http = serve.get("http_options") or {}
    lines.append("serve: " + (", ".join(
        f"{name} {app['status']} at http://{http.get('host')}:{http.get('port')}{app.get('route_prefix') or ''}"
        for name, app in (serve.get("applications") or {}).items()) or "no application"))
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (tgt.local.tracking_uri if tgt.local else None)
    if uri and uri.startswith("http"):
        lines.append(f"tracking server: {uri} {tracking_health(uri)}")
    else:
        lines.append(f"tracking server: none ({uri or 'MLFLOW_TRACKING_URI is not set'})")
    return lines
