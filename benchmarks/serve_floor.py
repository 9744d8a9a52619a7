"""What Ray Serve costs when the model costs nothing: the floor under issue 26's Serve targets.

Four servers answer known-user POST /recommend on loopback, one after another, in one run:

    plain null   uvicorn + FastAPI, one process: parses the request with the API's own schema
                 (serve/api.py RecommendRequest) and returns a constant ten-item answer
    serve null   the same FastAPI app as a Serve ingress deployment, with the Ranker's settings
                 from serve/config.yaml (autoscaling, num_cpus, max_ongoing_requests, logging)
    plain        `fusionrec serve --plain`, ranking 10,000 items (benchmarks/serve_load.py's shop)
    serve        `fusionrec serve` with serve/config.yaml, the same model

Each: one client, sequential (p50 / p99), then --clients closed-loop clients (2xx per second after
--warmup s). The null pair gives Serve's own per-request cost: its one-client p50 is the least any
Serve answer to this POST can take on this machine, and, if the model's work costs the same CPU
in both servers, the saturation ratio Serve can reach at most is

    1 / (1/plain + 1/serve_null - 1/plain_null)   divided by plain

(the plain server's time per request, with Serve's overhead in place of plain's). Last line: JSON.

    .venv/bin/python benchmarks/serve_floor.py [--seconds 10 --clients 32 --home DIR --config serve/config.yaml]
                                               [--proxy python: Serve's Python proxy instead of HAProxy]
"""

import asyncio
import json
import multiprocessing
import random
from pathlib import Path

import typer
from open_loop import percentiles
from serve_load import closed_loop, one_client, plain_server, prepare, requests_for, wait_until_up

CONFIG = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"
ANSWER = {"items": [{"item_id": f"i{n:05d}", "score": 4.5, "rating": 4.5} for n in range(10)], "model_version": "1"}


def null_api():
    """The API's known-user /recommend with no model behind it (and /healthz for wait_until_up)."""
    from fastapi import FastAPI

    from fusionrec.serve.api import RecommendRequest, RecommendResponse

    api = FastAPI()

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(request: RecommendRequest):
        return ANSWER

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return api


def run_plain_null(port: int) -> None:
    import uvicorn

    uvicorn.run(null_api(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


def measure(name: str, base: str, known: list[str], items: list[str], opt: dict) -> dict:
    import requests

    answer = requests.post(f"{base}/recommend", json={"user_id": known[0], "k": 10}, timeout=30)
    if answer.status_code != 200:
        raise RuntimeError(f"{name}: /recommend answered {answer.status_code}: {answer.text[:200]}")
    asyncio.run(one_client(base, known, 20))  # warm-up
    single = percentiles(asyncio.run(one_client(base, known, opt["sequential"])))
    reqs = requests_for(base, "known", known, items, 20_000, random.Random(0))
    rate, errors = asyncio.run(closed_loop(reqs, opt["clients"], opt["warmup"], opt["seconds"], 30))
    print(f"{name}: 1 client p50 {single['p50_ms']} ms, p99 {single['p99_ms']} ms; "
          f"saturation {rate:.1f}/s ({sum(errors.values())} errors{f', by status: {errors}' if errors else ''})",
          flush=True)
    return {"p50_ms": single["p50_ms"], "p99_ms": single["p99_ms"], "saturation_per_s": round(rate, 1),
            "errors": sum(errors.values()), "error_statuses": errors}


def main(seconds: float = 10, warmup: float = 5, clients: int = 32, sequential: int = 300, port: int = 18090,
         items: int = 10_000, users: int = 2000, home: Path | None = None, config: Path = CONFIG,
         proxy: str | None = None) -> None:
    _, known, item_ids = prepare(home, users, items, proxy)
    import ray
    from ray import serve

    from fusionrec.serve import app as serve_app

    opt = {"seconds": seconds, "warmup": warmup, "clients": clients, "sequential": sequential}
    results = {}

    base = f"http://127.0.0.1:{port + 1}"
    null = multiprocessing.get_context("spawn").Process(target=run_plain_null, args=(port + 1,), daemon=True)
    null.start()
    try:
        wait_until_up(base)
        results["plain_null"] = measure("plain null", base, known, item_ids, opt)
    finally:
        null.terminate()
        null.join(30)

    with plain_server(port + 2) as base:
        results["plain"] = measure("plain", base, known, item_ids, opt)

    settings = serve_app.read_config(config)
    from fusionrec.ops.ray_runtime import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    try:
        deployment = serve.deployment(serve.ingress(null_api())(type("NullRanker", (), {})), name="NullRanker")
        serve.run(deployment.options(**settings["deployments"]["Ranker"]).bind(), name="null", route_prefix="/",
                  logging_config=settings["logging"])
        wait_until_up(base)
        results["serve_null"] = measure("serve null", base, known, item_ids, opt)
        serve.delete("null")
        serve_app.start(port=port, config=config)
        wait_until_up(base)  # ready as plain was: /healthz answers 200
        results["serve"] = measure("serve", base, known, item_ids, opt)
    finally:
        serve.shutdown()
        ray.shutdown()

    rate = {name: r["saturation_per_s"] for name, r in results.items()}
    bound = 1 / (1 / rate["plain"] + 1 / rate["serve_null"] - 1 / rate["plain_null"]) / rate["plain"]
    print(f"Serve's floor for this POST: p50 {results['serve_null']['p50_ms']} ms (plain's "
          f"{results['plain_null']['p50_ms']} ms); saturation ratio at most {bound:.2f} with the model's work "
          f"(measured {rate['serve'] / rate['plain']:.2f}); null saturation Serve / plain "
          f"{rate['serve_null'] / rate['plain_null']:.2f}", flush=True)
    print(json.dumps({"items": len(item_ids), "clients": clients, "seconds": seconds, **results,
                      "saturation_ratio": round(rate["serve"] / rate["plain"], 3),
                      "saturation_ratio_bound": round(bound, 3),
                      "null_saturation_ratio": round(rate["serve_null"] / rate["plain_null"], 3)}))


if __name__ == "__main__":
    typer.run(main)
