"""Two-stage ranking (serve/candidates.py) against exact full ranking, through the served Ranker.

    .venv/bin/python benchmarks/retrieval.py [--candidates 100,200,500,1000,2000] [--epochs 10] [--users 1000]

Models trained for a few epochs by the project's own epoch loop (the one Tune's trials run, in
this process: `tune.fit_in_trial`), saved as bundles and loaded by `Ranker`, on
    shop        a synthetic shop, 2,000 users x 5,000 items, density 0.02, no images, no encoded
                text (FusionNeuMF on ids + structured attributes)
    movielens   MovieLens-100K (943 users, 1,682 items); FusionNeuMF on ids + genres, year, age,
                gender, occupation
for fusion and neumf under both objectives (rating: MSE; implicit: BCE with sampled negatives, whose
scores are logits) and svd (rating). For each user (up to --users), recall@100 = |two-stage top 100
& exact top 100| / |exact top 100|, seen items left out of both, averaged; two stages forced on
(`candidates_above=0`) with N candidates, proposed by the exact scan (flat) and by the inverted
file the service uses above FLAT_UP_TO items (ivf, forced on here). Catalogues this small make
large N a large share of the catalogue: read N against the item count. `rest` is how much of the
score the inner product leaves to the re-ranker (std over items of score - query . key, over std
of score, mean over users): near 0, the index alone ranks as the model does. The last line printed
is JSON. Latency and memory at 10k-1M items: benchmarks/serve_load.py --scale.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import typer

from fusionrec.data.movielens import convert
from fusionrec.data.synth import SynthConfig, generate
from fusionrec.models.bundle import save_bundle
from fusionrec.models.config import ModelConfig
from fusionrec.search.trial import fit_in_trial
from fusionrec.serve.candidates import CandidateIndex, item_keys, user_query
from fusionrec.serve.ranker import Ranker
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import loop_data, prepare

K = 100  # recall@K
TARGET = 0.95
ROWS = [("fusion", "rating"), ("fusion", "implicit"), ("neumf", "rating"), ("neumf", "implicit"), ("svd", "rating")]


def trained_bundle(dataset: Path, model: str, objective: str, epochs: int, out: Path, seed: int = 0,
                   batch_size: int = 256, lr: float = 5e-3) -> Path:
    """Train `model` on `dataset` in this process and save it as a bundle the Ranker loads."""
    cfg = TrainConfig(dataset=str(dataset), model=ModelConfig(model=model), epochs=epochs, objective=objective,
                      seed=seed, batch_size=batch_size, lr=lr)
    prepared = prepare(cfg)
    data = loop_data(prepared.users, prepared.items, prepared.ratings, prepared.split)
    with warnings.catch_warnings():  # outside a Tune trial: no checkpoint to resume from, said as a warning
        warnings.simplefilter("ignore")
        net, _ = fit_in_trial(cfg, data, torch.get_num_threads(), torch.device("cpu"))
    spec = prepared.dataset.spec
    save_bundle(out, net, prepared.users, prepared.items,
                {"dataset": spec.name, "rating_scale": [spec.rating_min, spec.rating_max],
                 "relevance_threshold": spec.relevance_threshold, "objective": objective, "split": cfg.split,
                 "seed": seed}, seen=prepared.part("fitted")[["user_idx", "item_idx"]].to_numpy())
    return out


def ranked(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def recall(exact: list[str], found: list[str]) -> float:
    return len(set(exact) & set(found)) / max(len(exact), 1)


def rest_share(model, rows: list[int]) -> float:
    """How much of the score the inner product leaves to the re-ranker: std over items of (score -
    query . key) / std of the score, averaged over users (0: the index ranks as the model does)."""
    keys = item_keys(model)  # [n_items, d + 1]
    shares = []
    for row in rows:
        user = model.users.gather(torch.tensor([row]))
        score = model.score_all_for(user).numpy()  # [n_items]
        shares.append(np.std(score - keys @ user_query(model, user)) / np.std(score))
    return float(np.mean(shares))


def recall_table(bundle: Path, candidates: list[int], users: int) -> dict[str, float]:
    """Mean recall@K of two stages with N candidates against exact ranking, per index kind and N
    ("flat/500", "ivf/500", ...); and rest_share."""
    exact, staged = Ranker(str(bundle), candidates_above=10**12), Ranker(str(bundle), candidates_above=0)
    assert exact.current.index is None and staged.current.index is not None
    ids = list(exact.current.users)[:users]
    truth = {u: ranked(exact.recommend(u, K)) for u in ids}
    out = {"rest_share": rest_share(exact.current.model, [exact.current.users[u] for u in ids[:200]])}
    indexes = {"flat": staged.current.index, "ivf": CandidateIndex.for_model(staged.current.model, flat_up_to=0)}
    for kind, index in indexes.items():
        staged.current.index = index
        for n in candidates:
            staged.candidates = n
            out[f"{kind}/{n}"] = float(np.mean([recall(truth[u], ranked(staged.recommend(u, K))) for u in ids]))
    return out


def recall_runs(root: Path, candidates: list[int], epochs: int, users: int) -> dict:
    generate(SynthConfig(users=2000, items=5000, density=0.02, seed=0, images=False), root / "shop", workers=1)
    convert(root / "movielens")
    table = {}
    for name in ("shop", "movielens"):
        n_items = pq.read_metadata(root / name / "items.parquet").num_rows
        for model, objective in ROWS:
            started = time.perf_counter()
            bundle = trained_bundle(root / name, model, objective, epochs, root / f"{name}-{model}-{objective}")
            row = f"{name}/{model}/{objective}"
            table[row] = recall_table(bundle, candidates, users)
            cells = "  ".join(f"{n}: {r:.4f}" for n, r in table[row].items() if n != "rest_share")
            print(f"{row:28s} {n_items:5d} items  rest {table[row]['rest_share']:.3f}  recall@{K}  {cells}   "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
    return table


def main(candidates: str = "100,200,500,1000,2000", epochs: int = 10,
         users: int = typer.Option(1000, help="Users whose rankings are compared (the first ones).")) -> None:
    torch.manual_seed(0)
    sizes = [int(size) for size in candidates.split(",")]
    print(f"recall@{K} of two stages (N candidates re-ranked; proposed by the flat scan and by the IVF) against "
          f"exact ranking, {epochs} epochs, up to {users} users", flush=True)
    with tempfile.TemporaryDirectory(prefix="fusionrec-retrieval-") as tmp:
        table = recall_runs(Path(tmp), sizes, epochs, users)
    reached = {f"{row}/{kind}": next((size for size in sizes if cells[f"{kind}/{size}"] >= TARGET), None)
               for row, cells in table.items() for kind in ("flat", "ivf")}
    print(json.dumps({f"recall_at_{K}": table, "target": TARGET, "smallest_n_reaching_target": reached}))


if __name__ == "__main__":
    typer.run(main)
