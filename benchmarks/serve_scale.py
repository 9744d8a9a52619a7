"""Ray Serve's /recommend as the catalogue grows: 10k, 100k and 1M items (issue 26 item 5).

    .venv/bin/python benchmarks/serve_scale.py [--items 10000,100000,1000000] [--calls 300] [--home DIR]

Per catalogue size, a synthetic shop with ids and structured attributes only (20,000 users, about
2 ratings an item, at most 2M; no text, no images), a FusionNeuMF trained one epoch in about 200
large batches (Adam steps the whole id table each batch: small batches take most of an hour at
1M items) and saved as a bundle; both are kept in --home and reused. Then:
  1. in this process, the candidate index built from that model as a replica builds it (a flat scan
     up to FLAT_UP_TO items, the IVF above): build time and the memory it adds;
  2. `fusionrec serve`'s application, started from the shipped serve/config.yaml with the bundle as
     its model: exact full ranking at or below its `candidates_above`, two stages above;
  3. one client, sequential known-user /recommend k=10 over HTTP: p50 and p99 (after a warm-up);
  4. recall@100: the served top 100 against exact full ranking (in this process, every item scored)
     for 50 users, and that exact ranking's median time (what a request would cost without the index);
  5. the ranker replica's resident memory (its process, found through Ray's state API).
The sizes run one after another, so a busy machine shows as noise between them: run it on a quiet
one. The last line printed is JSON, with the target p50(largest) <= 2 x p50(smallest).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import requests
import typer
import yaml
from open_loop import percentiles
from retrieval import recall, trained_bundle
from serve_load import one_client, wait_until_up

K = 100  # recall@K
RECALL_USERS = 50
USERS = 20_000


def structured_only(folder: Path) -> None:
    """Drop text and image from a dataset's spec: ids and structured attributes only."""
    spec = yaml.safe_load((folder / "dataset.yaml").read_text())
    for side in ("users", "items"):
        spec[side].pop("text", None)
        spec[side].pop("image", None)
    (folder / "dataset.yaml").write_text(yaml.safe_dump(spec))


def bundle_for(home: Path, items: int) -> Path:
    """The shop of `items` items and its trained FusionNeuMF bundle, made unless --home has them."""
    from fusionrec.data.synth import SynthConfig, generate

    shop, bundle = home / f"shop-{items}", home / f"bundle-{items}"
    if (bundle / "bundle.json").exists():  # written last
        return bundle
    ratings = min(2_000_000, 2 * items)
    started = time.perf_counter()
    generate(SynthConfig(users=USERS, items=items, density=ratings / (USERS * items), seed=0, images=False), shop,
             overwrite=True, workers=1)
    structured_only(shop)
    trained_bundle(shop, "fusion", "rating", 1, bundle, batch_size=max(256, ratings // 200), lr=2e-2)
    print(f"{items:,} items: shop and model made in {time.perf_counter() - started:.0f} s", flush=True)
    return bundle


def index_cost(bundle: Path) -> dict:
    """Build time and added memory of the index a replica would build for this bundle's model."""
    from fusionrec.models.bundle import load_bundle
    from fusionrec.serve.candidates import CandidateIndex

    model, _ = load_bundle(bundle)
    model.eval()
    model.score_all_for(model.users.row())  # the item towers, as a replica computes them on load
    before, started = psutil.Process().memory_info().rss, time.perf_counter()
    index = CandidateIndex.for_model(model)
    return {"kind": "flat" if index.exact else "ivf", "build_s": round(time.perf_counter() - started, 3),
            "memory_mb": round((psutil.Process().memory_info().rss - before) / 2**20, 1)}


def replica_rss_mb() -> float:
    """Resident memory of the ranker replicas' processes (each asked for its pid)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith("SERVE_REPLICA::fusionrec#Ranker#")]
    pids = [ray.get(ray.get_actor(name, namespace="serve").__ray_call__.remote(lambda _: os.getpid()))
            for name in names]
    return round(sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20, 1)


def served_recall(base: str, bundle: Path, users: list[str]) -> tuple[float, float]:
    """Mean recall@K of the served top K against exact ranking of every item (in this process),
    and the median milliseconds of that exact ranking (what a replica would spend without the index)."""
    from fusionrec.serve.ranker import Ranker

    exact = Ranker(str(bundle), candidates_above=10**12)
    found, took = [], []
    for user in users:
        served = requests.post(f"{base}/recommend", json={"user_id": user, "k": K}, timeout=60).json()
        started = time.perf_counter()
        truth = exact.recommend(user, K)
        took.append((time.perf_counter() - started) * 1000)
        found.append(recall([i["item_id"] for i in truth["items"]], [i["item_id"] for i in served["items"]]))
    return float(np.mean(found)), round(float(np.median(took)), 1)


def measure(bundle: Path, items: int, calls: int, port: int) -> dict:
    from fusionrec.serve import app as serve_app
    from fusionrec.serve.ranker import ranking_settings

    config = Path(__file__).parent.parent / "serve" / "config.yaml"
    settings = ranking_settings(serve_app.read_config(config)["args"])
    two_stage = items > settings["candidates_above"]
    result: dict = {"items": items, "two_stage": two_stage, "index": index_cost(bundle) if two_stage else None}
    started = time.perf_counter()
    serve_app.start(model_uri=str(bundle), port=port, config=config)
    result["deploy_s"] = round(time.perf_counter() - started, 1)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base)
        users = sorted(pd.read_parquet(bundle.parent / f"shop-{items}" / "users.parquet", columns=["user_id"])
                       ["user_id"])[:1000]
        asyncio.run(one_client(base, users, 20))  # warm-up
        result["one_client"] = {k: v for k, v in percentiles(asyncio.run(one_client(base, users, calls))).items()
                                if k in ("p50_ms", "p99_ms")}
        result[f"recall_at_{K}"], result["exact_in_process_p50_ms"] = served_recall(base, bundle, users[:RECALL_USERS])
        result["replica_rss_mb"] = replica_rss_mb()
    finally:
        serve_app.stop()
    index = result["index"]
    print(f"{items:>9,d} items: " + (f"two stages, {index['kind']} index built in {index['build_s']} s, "
                                     f"+{index['memory_mb']} MB" if index else "exact ranking, no index")
          + f"; 1 client p50 "
          f"{result['one_client']['p50_ms']} ms p99 {result['one_client']['p99_ms']} ms; recall@{K} "
          f"{result[f'recall_at_{K}']:.4f} (exact ranking in-process: {result['exact_in_process_p50_ms']} ms); "
          f"ranker replica {result['replica_rss_mb']:,.0f} MB", flush=True)
    return result


def main(items: str = "10000,100000,1000000", calls: int = 300, port: int = 18090, home: Path | None = None) -> None:
    import ray
    import torch

    torch.manual_seed(0)
    home = (home or Path(tempfile.gettempdir()) / "fusionrec-serve-scale").resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FUSIONREC_HOME"] = str(home)
    sizes = [int(size) for size in items.split(",")]
    bundles = {size: bundle_for(home, size) for size in sizes}
    print(f"one client, known-user /recommend k=10, {calls} calls a size; serve/config.yaml as shipped", flush=True)
    try:
        results = [measure(bundles[size], size, calls, port) for size in sizes]
    finally:
        ray.shutdown()
    ratio = results[-1]["one_client"]["p50_ms"] / results[0]["one_client"]["p50_ms"]
    print(f"p50 at {sizes[-1]:,} items / p50 at {sizes[0]:,}: {ratio:.2f} (target <= 2)", flush=True)
    print(json.dumps({"scale": results, "p50_ratio_largest_smallest": round(ratio, 3),
                      "targets": {"p50_ratio": {"value": round(ratio, 3), "target": "<= 2", "met": ratio <= 2},
                                  f"recall_at_{K}": {"value": min(r[f"recall_at_{K}"] for r in results),
                                                     "target": ">= 0.95",
                                                     "met": all(r[f"recall_at_{K}"] >= 0.95 for r in results)}}}))


if __name__ == "__main__":
    typer.run(main)
