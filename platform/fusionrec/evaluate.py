"""Scoring a trained model under one protocol for every model (RecBole-style).

- candidate: rank each user's test items by predicted rating (the paper's protocol; `metrics.py`).
- full: rank every item the user did not rate in training (train + validation); all of the user's
  test items are relevant (the Microsoft Recommenders protocol): HR, Precision, Recall, NDCG, MAP at K.
  Under a split that holds out whole items (`cold-items`) each test user ranks only the held-out
  test items, not the whole catalogue (a cold item competes with the other cold items).
  Two MAPs: `map@K` divides each user's sum of precisions at the hits by min(K, relevant items)
  (recommenders' `map_at_k` since 1.2); `map_all@K` by the number of relevant items (recommenders'
  `map`, which is what its `map_at_k` computed before 1.2 and what its published benchmark table shows).
- ncf: leave-one-out; the held-out item ranked against 99 sampled never-rated items: HR/NDCG@K.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fusionrec.data.fingerprint import data_fingerprint
from fusionrec.data.splits import Split, held_out_items, sample_negatives, split_by_name
from fusionrec.data.validate import Dataset, load_dataset
from fusionrec.metrics import candidate_metrics, leave_one_out_metrics, ranking_metrics
from fusionrec.models.bundle import load_bundle
from fusionrec.models.content import row_index, rows_of
from fusionrec.models.nets import Recommender

PROTOCOLS = ("candidate", "full", "ncf")


def index_ratings(dataset: Dataset, user_ids, item_ids) -> pd.DataFrame:
    """The ratings as user_idx, item_idx (row numbers in the model; unknown ids -> n, the unknown
    row), user_id, item_id, rating and, if present, timestamp. The RangeIndex is what splits index."""
    source = dataset.ratings
    ratings = pd.DataFrame({
        "user_idx": rows_of(source[dataset.user_id], row_index(user_ids)),
        "item_idx": rows_of(source[dataset.item_id], row_index(item_ids)),
        "user_id": source[dataset.user_id].to_numpy(), "item_id": source[dataset.item_id].to_numpy(),
        "rating": source["rating"].to_numpy(np.float32),
    })
    if "timestamp" in source:
        ratings["timestamp"] = source["timestamp"].to_numpy()
    return ratings


@torch.no_grad()
def predict(model: Recommender, users: np.ndarray, items: np.ndarray, scale: tuple[float, float] | None,
            batch_size: int = 8192) -> np.ndarray:
    """Scores for (user index, item index) pairs; clipped to the rating scale when given."""
    model.eval()
    out = []
    for start in range(0, len(users), batch_size):
        u = torch.tensor(users[start:start + batch_size], dtype=torch.long, device=model.device)
        i = torch.tensor(items[start:start + batch_size], dtype=torch.long, device=model.device)
        out.append(model(u, i).float().cpu().numpy())
    scores = np.concatenate(out) if out else np.zeros(0, np.float32)
    return np.clip(scores, *scale) if scale else scores


def candidate(model: Recommender, test: pd.DataFrame, scale, k: int, threshold: float, objective: str) -> dict:
    """`test` has user_idx, item_idx, user_id, item_id, rating."""
    frame = test.assign(prediction=predict(model, test["user_idx"].to_numpy(), test["item_idx"].to_numpy(),
                                           scale if objective == "rating" else None))
    result = candidate_metrics(frame[["user_id", "item_id", "rating", "prediction"]], k=k, threshold=threshold)
    if objective != "rating":  # scores are logits, not ratings: an MSE of them would mean nothing
        result["mse"] = result["rmse"] = None
    return result


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores (all, if fewer), best first; ties by index."""
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
    return top[np.argsort(-scores[top], kind="stable")]


def top_k_among(scores: np.ndarray, candidates: np.ndarray | None, seen, k: int) -> np.ndarray:
    """The k best items (indices into `scores`, best first) among `candidates` (None: every item),
    leaving out `seen`; fewer than k if fewer remain."""
    pool = np.arange(len(scores)) if candidates is None else np.asarray(candidates, np.int64)
    pool = pool[~np.isin(pool, np.asarray(list(seen), np.int64))]
    return pool[top_k(scores[pool], k)]


@torch.no_grad()
def full_ranking(model: Recommender, train: pd.DataFrame, test: pd.DataFrame, k: int,
                 candidates: np.ndarray | None = None) -> dict:
    """Top-k over all items not rated in `train` (pass train + validation), per test user; every test
    item is relevant (`metrics.ranking_metrics`). `candidates`: rank only these items (item rows; a
    cold-items split's held-out items, `held_out_items(test)`) instead of the whole catalogue."""
    seen = train.groupby("user_idx")["item_idx"].agg(list).to_dict()
    relevant = test.groupby("user_idx")["item_idx"].agg(set)
    recommended = []
    for user in relevant.index:
        scores = model.score_all(int(user)).float().cpu().numpy()
        recommended.append(top_k_among(scores, candidates, seen.get(user, []), k))
    return ranking_metrics(recommended, list(relevant), k)


def ranking_candidates(split: Split, part: pd.DataFrame) -> np.ndarray | None:
    """What a part's users rank under full ranking: the part's held-out items for a split that holds
    out whole items (`cold-items`), else None (every item)."""
    return held_out_items(part) if split.ranks_held_out else None


@torch.no_grad()
def ncf(model: Recommender, ratings: pd.DataFrame, test: pd.DataFrame, n_items: int, k: int = 10,
        negatives: int = 99, seed: int = 0) -> dict:
    """HR@k / NDCG@k of each held-out item among `negatives` sampled items the user never rated."""
    sampled = sample_negatives(ratings, test.index.to_numpy(), np.arange(n_items), n=negatives,
                               user_col="user_idx", item_col="item_idx", seed=seed)
    ranks = []
    for user, item in zip(test["user_idx"], test["item_idx"], strict=True):
        candidates = np.concatenate([[item], sampled[user]])
        scores = predict(model, np.full(len(candidates), user), candidates, None)
        ranks.append(int((scores > scores[0]).sum()))  # 0-based position of the held-out item
    return leave_one_out_metrics(ranks, k)


def evaluate_bundle(dataset_path: Path, bundle: Path, protocol: str = "candidate", k: int = 5) -> dict:
    """Re-create a trained model's split on its dataset and score the test part under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    model, meta = load_bundle(bundle)
    dataset = load_dataset(dataset_path, check_images=False)
    trained_on = meta.get("fingerprints", {}).get("data")
    if trained_on != data_fingerprint(dataset):
        # Its split would be re-drawn over other ratings: "test" rows might have been trained on.
        raise ValueError(f"{dataset_path}: not the data this model was trained on (dataset fingerprint "
                         f"{data_fingerprint(dataset)}, the model's {trained_on or 'unrecorded'})")
    ratings = index_ratings(dataset, meta["users"]["ids"], meta["items"]["ids"])
    n_items = len(meta["items"]["ids"])
    split = split_by_name(ratings, meta["split"], meta["seed"])
    test = ratings.iloc[split.test]
    if protocol == "candidate":
        return candidate(model, test, tuple(meta["rating_scale"]), k, meta["relevance_threshold"], meta["objective"])
    if protocol == "full":
        return full_ranking(model, ratings.iloc[split.fitted], test, k, ranking_candidates(split, test))
    if meta["split"] != "loo":
        raise ValueError("the ncf protocol needs a model trained with --split loo")
    return ncf(model, ratings, test, n_items, k=k, seed=meta["seed"])
