"""The Ray Serve application: the Ranker answers HTTP itself; the Encoder only for new users' content.

    Ranker    the HTTP API of serve/api.py and the model (models:/fusionrec@champion by default,
              following the alias): known users' /recommend and /predict, about 90 % of traffic,
              are answered here, one hop from the proxy
    Encoder   text/image of new users, with the encoders the model's features were made with,
              called through a deployment handle only when a new user sends text or an image

Each deployment autoscales by its `autoscaling_config` in serve/config.yaml. Start it with
`fusionrec serve [--config serve/config.yaml]` (a local Ray, or RAY_ADDRESS) or, on a running
cluster, `serve deploy serve/config.yaml` (import path `fusionrec.serve.app:build`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from fusionrec.registry import CHAMPION_URI
from fusionrec.serve.api import LocalBackend, build_api

APP_NAME = "fusionrec"
WORKER_NICENESS = "RAY_worker_niceness"  # Ray's setting: the nice value the raylet starts workers at
DEPLOYMENTS = ("Ranker", "Encoder")


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@serve.deployment(name="Encoder", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=8)
class EncoderDeployment:
    async def __init__(self, cache: str | None, threads: int = 1):
        _torch_threads(threads)
        from fusionrec.serve.encoding import PayloadEncoder

        self.encoder = PayloadEncoder(Path(cache) if cache else None)
        # Load the encoders the served model needs before this replica takes requests: one added
        # under load otherwise loaded them with its first request, which, and every request queued
        # behind it, then waited seconds (up to 7 s in benchmarks/serve_load.py).
        info = await serve.get_deployment_handle("Ranker", APP_NAME).info.remote()
        await asyncio.to_thread(self.encoder.ready, info["user_encoders"])

    async def encode(self, encoders: dict, text: str | None, image: bytes | None) -> dict:
        return await self._encode_together((encoders, text, image))

    # Calls that arrive while a batch is being encoded wait, and go through the model together next
    # (no wait is added for more: at low load a call goes alone). On a CPU, 4 texts through MiniLM
    # take 21 ms together against 56 ms one after another (PayloadEncoder.answer_many).
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0)
    async def _encode_together(self, calls: list[tuple[dict, str | None, bytes | None]]) -> list[dict]:
        # In a thread: the replica's event loop meanwhile takes the calls that make the next batch.
        return await asyncio.to_thread(self.encoder.answer_many, calls)

    def ready(self, encoders: dict) -> str | None:
        return self.encoder.ready(encoders)

    def loaded(self) -> list[dict]:
        return self.encoder.loaded()


async def _once_more_if_replica_died(method, *args):
    """Every call here is read-only, so a call lost with a dying replica is safely sent again
    (the router picks a live one): an encoder replica's crash costs latency, not failed requests."""
    try:
        return await method.remote(*args)
    except RayActorError:
        return await method.remote(*args)


class RemoteEncoderBackend(LocalBackend):
    """serve/api.py's Backend in a Ranker replica: ranking in this process, `encoder` a deployment handle."""

    async def encode(self, encoders: dict, text: str | None, image: bytes | None) -> dict:
        return await _once_more_if_replica_died(self.encoder.encode, encoders, text, image)

    async def ready(self, encoders: dict) -> str | None:
        return await _once_more_if_replica_died(self.encoder.ready, encoders)


@serve.deployment(name="Ranker", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=32)
@serve.ingress()
class RankerDeployment:
    def __init__(self, encoder: DeploymentHandle, model_uri: str, refresh_s: float, tracking_uri: str | None,
                 threads: int = 1, ranking: dict | None = None):
        if tracking_uri:  # the driver's MLflow store, whatever this replica's environment says
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        _torch_threads(threads)
        from fusionrec.serve.ranker import Ranker

        self.ranker = Ranker(model_uri, refresh_s, **(ranking or {}))
        self.ranker.follow_alias()
        self.backend = RemoteEncoderBackend(self.ranker, encoder)

    def __serve_build_asgi_app__(self):
        return build_api(self.backend)

    def info(self) -> dict:
        return self.ranker.info()


def build(args: dict) -> serve.Application:
    """The application builder (`serve deploy` / `serve run fusionrec.serve.app:build`). `args`:
    model_uri, refresh_s (alias polling), tracking_uri (MLflow; default this process's), cache
    (the encoder cache), threads (torch threads per replica), candidates_above and candidates (two-stage
    ranking: serve/ranker.py). Serve applies the config's
    per-deployment settings itself."""
    return application(args)


def application(args: dict, options: dict[str, dict] | None = None) -> serve.Application:
    """The deployment graph; `options` are per-deployment overrides (autoscaling_config, ...)."""
    from fusionrec import registry
    from fusionrec.serve.ranker import ranking_settings

    options = options or {}
    threads = int(args.get("threads", 1))
    encoder = EncoderDeployment.options(**options.get("Encoder", {})).bind(args.get("cache"), threads)
    return RankerDeployment.options(**options.get("Ranker", {})).bind(
        encoder, str(args.get("model_uri", CHAMPION_URI)), float(args.get("refresh_s", 5.0)),
        args.get("tracking_uri") or registry.tracking_uri(), threads, ranking_settings(args))


def read_config(path: Path | None) -> dict:
    """serve/config.yaml (Serve's own deploy schema, checked by it) as {"http", "args", "deployments", "logging"}."""
    if path is None:
        return {"http": {}, "args": {}, "deployments": {}, "logging": None}
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from fusionrec.serve.ranker import ranking_settings

    try:
        raw = yaml.safe_load(Path(path).read_text())
        schema = ServeDeploySchema.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ValueError(f"{path}: not a valid Serve config: {str(exc).splitlines()[0]}") from None
    apps = [a for a in schema.applications if a.name == APP_NAME]
    if not apps:
        raise ValueError(f"{path}: no application named {APP_NAME!r}")
    deployments = {}
    for deployment in raw["applications"][schema.applications.index(apps[0])].get("deployments", []):
        if deployment.get("name") not in DEPLOYMENTS:
            raise ValueError(f"{path}: unknown deployment {deployment.get('name')!r} "
                             f"(expected {', '.join(DEPLOYMENTS)})")
        deployments[deployment["name"]] = {k: v for k, v in deployment.items() if k != "name"}
    try:
        ranking_settings(apps[0].args or {})
    except ValueError as exc:
        raise ValueError(f"{path}: args.{exc}") from None
    return {"http": raw.get("http_options", {}), "args": apps[0].args or {}, "deployments": deployments,
            "logging": raw["applications"][schema.applications.index(apps[0])].get("logging_config")}


def start(model_uri: str | None = None, host: str | None = None, port: int | None = None,
          config: Path | None = None) -> dict:
    """Deploy the application on the current Ray (started if needed) and wait until it answers.
    Flags override the config file. Returns the model's /model description."""
    from fusionrec import registry
    from fusionrec.ops.ray_runtime import ensure_ray, environment

    settings = read_config(config)
    args = {**settings["args"], **({"model_uri": model_uri} if model_uri else {})}
    registry.resolve(str(args.get("model_uri", CHAMPION_URI)))  # fail here, in one line, if it does not exist
    http = {"host": host or settings["http"].get("host", "127.0.0.1"),
            "port": port or settings["http"].get("port", 8000)}
    # Ray starts its workers at nice 15, below every other process on the machine (its own GCS and
    # raylet, the clients, a plain server). On a machine that serves, the replicas are the work: a
    # local Ray started here runs them at nice 0, as a plain server runs: p99 at half load 1.15x
    # plain's (median of 5), against 1.66-2.20x at 15 (README, Load, ninth look). A joined cluster
    # keeps its nodes' own setting.
    with environment({WORKER_NICENESS: os.environ.get(WORKER_NICENESS, "0")}):
        ensure_ray()
    serve.start(http_options=http)
    serve.run(application(args, settings["deployments"]), name=APP_NAME, route_prefix="/",  # returns once healthy
              logging_config=settings["logging"])
    return serve.get_deployment_handle("Ranker", APP_NAME).info.remote().result()


def running_replicas(deployment: str) -> int:
    """How many replicas of one of the application's deployments are running now (0 if not deployed)."""
    application = serve.status().applications.get(APP_NAME)
    if application is None or deployment not in application.deployments:
        return 0
    return int(application.deployments[deployment].replica_states.get("RUNNING", 0))


def stop() -> None:
    """Remove the application and Serve; whatever of them has started (Ctrl-C may come while starting)."""
    if not ray.is_initialized():  # serve.delete() would start a Ray to look in
        return
    with contextlib.suppress(RayServeException):  # Serve never started
        serve.delete(APP_NAME)
    serve.shutdown()
