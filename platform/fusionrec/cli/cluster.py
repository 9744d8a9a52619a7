"""`fusionrec cluster ...` (a local multi-node Ray) and `fusionrec job ...` (jobs on a cluster)."""

from __future__ import annotations

from typing import Annotated

import typer

from fusionrec.cli.base import at_least, friendly_errors

cluster_app = typer.Typer(help="A local multi-node Ray cluster with an MLflow tracking server.", no_args_is_help=True)
job_app = typer.Typer(help="Ray jobs (jobs/*.py) on the local cluster or the one in RAY_ADDRESS.",
                      no_args_is_help=True)


@cluster_app.command("up")
@friendly_errors
def cluster_up(
    workers: Annotated[int, typer.Option(help="Worker nodes beside the head.", callback=at_least(0))] = 1,
    cpus_per_node: Annotated[int, typer.Option(help="CPUs each node offers.", callback=at_least(1))] = 1,
    object_store_mb: Annotated[int, typer.Option(help="Object store per node, MiB (at least 64).",
                                                   callback=at_least(64))] = 256,
) -> None:
    """Start a head and N worker nodes on this machine plus an MLflow tracking server, detached;
    prints the two exports (eval "$(fusionrec cluster up)" sets them)."""
    from fusionrec.ops.cluster import up

    state = up(workers, cpus_per_node, object_store_mb * 1024**2)
    typer.echo(f"cluster up: a head and {workers} worker node{'s' * (workers != 1)}, {cpus_per_node} CPU "
               f"a node; dashboard {state.dashboard_url}; tracking server {state.tracking_uri} (store in "
               f"{state.home}); logs in {state.logs}; `fusionrec cluster down` stops it", err=True)
    typer.echo(f"export RAY_ADDRESS={state.address}")
    typer.echo(f"export MLFLOW_TRACKING_URI={state.tracking_uri}")


@cluster_app.command("status")
@friendly_errors
def cluster_status() -> None:
    """Nodes and CPUs, running jobs, the Serve application and the tracking server (RAY_ADDRESS's
    cluster if set, else the local one)."""
    from fusionrec.ops.cluster import status, target

    try:
        tgt = target()
    except RuntimeError as exc:
        typer.echo(str(exc))
        return
    for line in status(tgt):
        typer.echo(line)


@cluster_app.command("down")
@friendly_errors
def cluster_down() -> None:
    """Stop exactly what `fusionrec cluster up` started (its recorded processes); safe to repeat."""
    from fusionrec.ops.cluster import down

    stopped = down()
    typer.echo("no cluster" if stopped is None else f"cluster down: {stopped} processes stopped")


def _target():
    from fusionrec.ops.cluster import target

    tgt = target()
    if tgt.local:
        typer.echo(f"cluster {tgt.address} (fusionrec cluster up)", err=True)
    return tgt


@job_app.command("submit", context_settings={"ignore_unknown_options": True})
@friendly_errors
def job_submit(
    name: Annotated[str, typer.Argument(help="The job: encode, train, tune or ablate (jobs/NAME.py).")],
    args: Annotated[list[str] | None, typer.Argument(help="The job's own flags, after `--`.")] = None,
    wait: Annotated[bool, typer.Option(help="Stream the logs until the job ends (--no-wait: print its id).")]
    = True,
) -> None:
    """Package this directory and run jobs/NAME.py with ARGS on the cluster; exits 0 only if the job succeeds."""
    from fusionrec.ops import jobs

    tgt = _target()
    job_id = jobs.submit(tgt, name, args or [])
    typer.echo(f"submitted {job_id}", err=True)
    if not wait:
        typer.echo(job_id)
        return
    try:
        outcome = jobs.follow(tgt, job_id, lambda text: typer.echo(text, nl=False))
    except KeyboardInterrupt:
        typer.echo(f"\n{job_id} keeps running: `fusionrec job logs {job_id}`, `fusionrec job stop {job_id}`",
                   err=True)
        raise typer.Exit(130) from None
    typer.echo(f"job {job_id} {outcome}", err=True)
    if outcome != "SUCCEEDED":
        raise typer.Exit(1)


@job_app.command("list")
@friendly_errors
def job_list() -> None:
    """Every job on the cluster, oldest first: id, status, entrypoint."""
    from fusionrec.ops import jobs

    for job in jobs.list_jobs(_target()):
        typer.echo(f"{job.submission_id or job.job_id}  {job.status.value:9s}  {job.entrypoint}")


@job_app.command("logs")
@friendly_errors
def job_logs(job_id: Annotated[str, typer.Argument(help="Submission id (from `fusionrec job list`).")]) -> None:
    """Print a job's logs so far."""
    from fusionrec.ops import jobs

    typer.echo(jobs.logs(_target(), job_id), nl=False)


@job_app.command("stop")
@friendly_errors
def job_stop(job_id: Annotated[str, typer.Argument(help="Submission id (from `fusionrec job list`).")]) -> None:
    """Stop a running job."""
    from fusionrec.ops import jobs

    stopped = jobs.stop(_target(), job_id)
    typer.echo(f"{job_id}: {'stopping' if stopped else 'already ended'}")
