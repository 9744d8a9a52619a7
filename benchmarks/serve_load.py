"""Load on the served model: Ray Serve (Ingress -> Encoder -> Ranker) against one plain FastAPI +
uvicorn process serving the same registered model, on loopback.

Setup (once per --home; reused afterwards): a synthetic shop of 10,000 items with text and
structured attributes (no images: they would only lengthen the setup), its text encoded, a
FusionNeuMF trained for one epoch and registered twice (versions 1 and 2; 1 is champion).

    1. one client, sequential /recommend for known users, ranking all items: p50 / p99
    2. closed loop: C clients for T seconds, 70 % /recommend (known users), 10 % /recommend (new
       users described by text), 20 % /predict (20 items): RPS, p50/p95/p99, non-2xx, and the
       ranker replica count every 2 s; then idle, watching the replicas go back down
    3. resilience: under the same load, one ranker replica is killed: failures in the 10 s after
       the kill and after that
    4. promotion under load: champion moved to version 2: failures, seconds until /model says 2
    5. `fusionrec serve --plain` (a subprocess) under phases 1 and 2: the ratios

    .venv/bin/python benchmarks/serve_load.py [--clients 32 --seconds 60 --items 10000 --home DIR]
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import typer

TEXTS = ["I love linen summer dresses for the beach", "silk evening gowns in deep colours",
         "comfortable cotton for work, nothing flashy", "bold floral prints for weddings"]


def setup(home: Path, users: int, items: int) -> None:
    """Shop, text features and two registered versions, unless --home already has them."""
    from fusionrec import registry
    from fusionrec.data.synth import SynthConfig, generate
    from fusionrec.data.validate import load_dataset
    from fusionrec.encoders.pipeline import EncodeConfig, encode_dataset
    from fusionrec.train import TrainConfig, train

    registry.setup()
    try:
        registry.resolve("models:/fusionrec/2")
        print(f"reusing the shop and models in {home}")
        return
    except ValueError:
        pass
    shop, features = home / "shop", home / "features"
    print(f"setup in {home}: synthetic shop {users} users x {items} items, text features, two model versions...")
    generate(SynthConfig(users=users, items=items, density=min(1.0, 20 / items), seed=0, images=False), shop)
    encode_dataset(load_dataset(shop, check_images=False), features,
                   EncodeConfig(cache=home / "models", batch_size=64, actors=2))
    for seed in (0, 1):
        train(TrainConfig(dataset=str(shop), features=str(features), epochs=1, batch_size=1024, seed=seed),
              register=True)
    registry.promote("1")


class Recorder:
    def __init__(self):
        self.rows: list[tuple[float, float, int]] = []  # (finished at, latency s, status; 0 = no answer)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        rows = [r for r in self.rows if since <= r[0] < until]
        if not rows:
            return {"requests": 0}
        latency = np.array([r[1] for r in rows]) * 1000
        span = max(r[0] for r in rows) - min(r[0] - r[1] for r in rows)
        return {"requests": len(rows), "rps": len(rows) / span, "p50_ms": np.percentile(latency, 50),
                "p95_ms": np.percentile(latency, 95), "p99_ms": np.percentile(latency, 99),
                "non_2xx": sum(not 200 <= r[2] < 300 for r in rows)}


def line(name: str, s: dict) -> str:
    if not s["requests"]:
        return f"{name}: no requests"
    return (f"{name}: {s['requests']} requests, {s['rps']:.1f} req/s, p50 {s['p50_ms']:.1f} ms, "
            f"p95 {s['p95_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, non-2xx {s['non_2xx']}")


async def one(session: aiohttp.ClientSession, url: str, body: dict, recorder: Recorder) -> None:
    start = time.monotonic()
    try:
        async with session.post(url, json=body) as response:
            await response.read()
            status = response.status
    except (TimeoutError, aiohttp.ClientError):
        status = 0
    recorder.rows.append((time.monotonic(), time.monotonic() - start, status))


def request_mix(base: str, users: list[str], items: list[str], rng: random.Random) -> tuple[str, dict]:
    draw = rng.random()
    if draw < 0.7:
        return f"{base}/recommend", {"user_id": rng.choice(users), "k": 10}
    if draw < 0.8:
        return f"{base}/recommend", {"user": {"text": rng.choice(TEXTS)}, "k": 10}
    return f"{base}/predict", {"user_id": rng.choice(users), "item_ids": rng.sample(items, 20)}


async def closed_loop(base: str, users: list[str], items: list[str], clients: int, seconds: float,
                      recorder: Recorder, during=None) -> None:
    """`clients` clients each sending the next request as soon as the last is answered; `during` is
    an async function run alongside (it gets the loop's start time)."""
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=60)

    async def client(n: int) -> None:
        rng = random.Random(n)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                await one(session, *request_mix(base, users, items, rng), recorder)

    tasks = [client(n) for n in range(clients)] + ([during(time.monotonic())] if during else [])
    await asyncio.gather(*tasks)


async def sequential(base: str, users: list[str], n: int, recorder: Recorder) -> None:
    async with aiohttp.ClientSession() as session:
        for k in range(n):
            await one(session, f"{base}/recommend", {"user_id": users[k % len(users)], "k": 10}, recorder)


def ranker_replicas() -> int:
    from ray import serve

    states = serve.status().applications["fusionrec"].deployments["Ranker"].replica_states
    return int(states.get("RUNNING", 0))


async def watch_replicas(timeline: list[tuple[float, int]], t0: float, seconds: float) -> None:
    while time.monotonic() - t0 < seconds:
        timeline.append((time.monotonic() - t0, await asyncio.to_thread(ranker_replicas)))
        await asyncio.sleep(2)


async def model_version(base: str) -> str | None:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/model") as response:
        return (await response.json()).get("version")


def wait_until_up(base: str, seconds: float = 120) -> None:
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base} did not come up within {seconds:.0f} s")


def kill_one_ranker() -> None:
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "#Ranker#" in a["name"]]
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)


def main(clients: int = 32, seconds: float = 60, idle: float = 45, sequential_requests: int = 300,
         users: int = 2000, items: int = 10_000, port: int = 8000, home: Path | None = None) -> None:
    home = (home or Path(tempfile.gettempdir()) / "fusionrec-serve-bench").resolve()
    os.environ["FUSIONREC_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    setup(home, users, items)

    from fusionrec import registry
    from fusionrec.serve import app as serve_app

    registry.promote("1")
    info = serve_app.start(port=port, config=Path(__file__).parent.parent / "serve" / "config.yaml")
    base = f"http://127.0.0.1:{port}"
    import pandas as pd

    ratings = pd.read_parquet(home / "shop" / "ratings.parquet")
    known = sorted(ratings["user_id"].unique().tolist())
    item_ids = sorted(pd.read_parquet(home / "shop" / "items.parquet")["item_id"].tolist())
    print(f"Ray Serve: model version {info['version']}, {info['items']:,} items, {clients} clients, {seconds:.0f} s")

    serve_single, serve_load = Recorder(), Recorder()
    asyncio.run(sequential(base, known, 20, Recorder()))  # warm-up
    asyncio.run(sequential(base, known, sequential_requests, serve_single))
    print(line("  1 client, /recommend", serve_single.summary()))

    timeline: list[tuple[float, int]] = []
    asyncio.run(closed_loop(base, known, item_ids, clients, seconds, serve_load,
                            during=lambda t0: watch_replicas(timeline, t0, seconds)))
    print(line(f"  {clients} clients, mix", serve_load.summary()))
    peak = max(n for _, n in timeline)
    scaled = min(t for t, n in timeline if n == peak)  # seconds into the load when the replicas peaked
    load_start = min(r[0] - r[1] for r in serve_load.rows)
    print(line(f"    of which after scaling up to {peak} rankers ({scaled:.0f} s in)",
               serve_load.summary(since=load_start + scaled)))
    t0 = time.monotonic()
    asyncio.run(watch_replicas(timeline, t0 - seconds, seconds + idle))  # the idle tail, same clock
    print("  ranker replicas (s: n): " + ", ".join(f"{t:.0f}: {n}" for t, n in timeline))

    resilience = Recorder()
    killed: list[tuple[float, int]] = []

    async def kill_when_scaled_up(t0: float) -> None:
        """Under load the ranker scales up again; kill one of its replicas once there are two."""
        while await asyncio.to_thread(ranker_replicas) < 2 and time.monotonic() - t0 < 60:
            await asyncio.sleep(1)
        killed.append((time.monotonic(), await asyncio.to_thread(ranker_replicas)))
        await asyncio.to_thread(kill_one_ranker)

    asyncio.run(closed_loop(base, known, item_ids, clients, 60, resilience, during=kill_when_scaled_up))
    at, running = killed[0]
    print(f"  one of {running} ranker replicas killed under load:")
    print(line("    the 10 s after", resilience.summary(at, at + 10)))
    print(line("    later", resilience.summary(at + 10)))

    promotion = Recorder()
    switched: list[float] = []

    async def promote_and_watch(t0: float) -> None:
        await asyncio.sleep(3)
        started = time.monotonic()
        await asyncio.to_thread(registry.promote, "2")
        while await model_version(base) != "2" and time.monotonic() - started < 60:
            await asyncio.sleep(0.5)
        switched.append(time.monotonic() - started)

    asyncio.run(closed_loop(base, known, item_ids, clients, 25, promotion, during=promote_and_watch))
    print(line("  promotion 1 -> 2 under load", promotion.summary()) + f"; /model said 2 after {switched[0]:.1f} s")
    serve_app.stop()
    registry.promote("1")

    plain = subprocess.Popen([str(Path(sys.executable).parent / "fusionrec"), "serve", "--plain", "--port",
                              str(port + 1), "--model-uri", "models:/fusionrec/1"], env=os.environ.copy())
    try:
        plain_base = f"http://127.0.0.1:{port + 1}"
        wait_until_up(plain_base)
        plain_single, plain_load = Recorder(), Recorder()
        asyncio.run(sequential(plain_base, known, 20, Recorder()))
        asyncio.run(sequential(plain_base, known, sequential_requests, plain_single))
        asyncio.run(closed_loop(plain_base, known, item_ids, clients, seconds, plain_load))
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    print("plain FastAPI + uvicorn, one process:")
    print(line("  1 client, /recommend", plain_single.summary()))
    print(line(f"  {clients} clients, mix", plain_load.summary()))
    s, p = serve_load.summary(), plain_load.summary()
    single = serve_single.summary()["p50_ms"] / plain_single.summary()["p50_ms"]
    print(f"ratios Serve / plain: 1-client p50 {single:.2f}; "
          f"{clients} clients: RPS {s['rps'] / p['rps']:.2f}, p50 {s['p50_ms'] / p['p50_ms']:.2f}, "
          f"p99 {s['p99_ms'] / p['p99_ms']:.2f} (target <= 2)")


if __name__ == "__main__":
    typer.run(main)
