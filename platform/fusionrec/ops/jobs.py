"""`fusionrec job`: the entrypoints in jobs/ as Ray jobs, through Ray's job API (JobSubmissionClient).

A submission packages the working directory (the code that runs is the code you have, not what
the cluster has installed) without the virtualenv, git, the state folder or dataset folders:
data is read where the cluster can see it (on the local cluster, this machine's disk, so give
absolute paths). The tracking URI goes with the job, so every job logs to the same MLflow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from fusionrec.config import state_folder
from fusionrec.ops.cluster import Target, job_client

JOBS_DIR = "jobs"
# gitignore-style, relative to the working directory (Ray also honours .gitignore)
EXCLUDES = ["/.git/", "/.venv/", "/.fusionrec/", "/mlruns/", "__pycache__/", ".pytest_cache/", ".ruff_cache/",
            "*.egg-info/"]


def _dataset_folders(root: Path) -> list[str]:
    """Folders under `root` holding a dataset.yaml (the contract's marker), as anchored excludes."""
    found = []
    skip = {".git", ".venv", "__pycache__", "node_modules"}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if s not in skip]
        if "dataset.yaml" in files:
            found.append(f"/{Path(folder).relative_to(root).as_posix()}/")
            subfolders.clear()
    return found


def runtime_env(tgt: Target, root: Path) -> dict:
    """The job's runtime_env: the packaged working directory (and fusionrec's own source as a
    module, ahead of any installed copy) and the environment every job needs."""
    excludes = EXCLUDES + _dataset_folders(root)
    state = state_folder()
    if state.is_relative_to(root.resolve()) and state != root.resolve():
        excludes.append(f"/{state.relative_to(root.resolve()).as_posix()}/")
    env_vars = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or (tgt.local.tracking_uri if tgt.local else None)
    home = os.environ.get("FUSIONREC_HOME") or (tgt.local.home if tgt.local else None)
    env_vars |= {"MLFLOW_TRACKING_URI": tracking} if tracking else {}
    env_vars |= {"FUSIONREC_HOME": home} if home else {}
    env = {"working_dir": str(root), "excludes": excludes, "env_vars": env_vars}
    source = root / "platform" / "fusionrec"
    if source.is_dir():
        env["py_modules"] = [str(source)]
    return env


def available(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / JOBS_DIR).glob("*.py"))


def submit(tgt: Target, name: str, args: list[str], root: Path | None = None) -> str:
    """Submit jobs/NAME.py with `args`; returns the submission id."""
    root = (root or Path.cwd()).resolve()
    if not (root / JOBS_DIR / f"{name}.py").is_file():
        have = ", ".join(available(root)) or "none"
        raise ValueError(f"{JOBS_DIR}/{name}.py: no such job in {root} (jobs here: {have})")
    client = job_client(tgt)
    # Ray's packaging logs each upload, each ignored file and a warning about its own default excludes
    for logger in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    return client.submit_job(entrypoint=shlex.join(["python", f"{JOBS_DIR}/{name}.py", *args]),
                             runtime_env=runtime_env(tgt, root), metadata={"fusionrec_job": name})


def follow(tgt: Target, job_id: str, write: Callable[[str], None]) -> str:
    """Stream the job's logs until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    client = job_client(tgt)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            write(lines)

    asyncio.run(tail())
    return client.get_job_status(job_id).value


def list_jobs(tgt: Target) -> list:
    """Every job the cluster knows, oldest first."""
    return sorted(job_client(tgt).list_jobs(), key=lambda j: j.start_time or 0)


def logs(tgt: Target, job_id: str) -> str:
    return job_client(tgt).get_job_logs(job_id)


def stop(tgt: Target, job_id: str) -> bool:
    """Ask the job to stop; False if it had already ended."""
    return job_client(tgt).stop_job(job_id)
