"""Connecting to Ray: an existing cluster when RAY_ADDRESS says so, else a small local one."""

from __future__ import annotations

import os

from fusionrec.verbosity import quiet_ray_libraries

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2  # Ray's default reserves ~30 % of memory: cap it on small machines


def ensure_ray(num_cpus: int | None = None) -> None:
    """Start (or join) Ray once per process; quiet, loopback-only dashboard off, usage stats off."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        # address="local": a new local Ray even when `ray start` left a cluster running on this
        # machine (ray.init() would join that one, and refuse num_cpus for it).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=False)
    quiet_ray_libraries()


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
