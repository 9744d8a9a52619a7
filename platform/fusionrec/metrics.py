"""Rating and ranking metrics. Ground floor: no project imports.

The *candidate* protocol (the paper's): each user's rows are ranked by `prediction`
(descending, ties broken by `item_id` ascending) and the top K are the recommendations.

- Precision@K = (top-K rows with rating >= threshold) / K, divided by K even when the user has
  fewer than K rows.
- NDCG@K = DCG / IDCG, DCG = sum over top-K positions p = 1.. of (2^rating - 1) / log2(p + 1);
  IDCG the same over the user's rows sorted by rating; users with IDCG = 0 are skipped.
- Both are averaged over users; `users` counts the users averaged (all users with a row).

Ranking over all items (`ranking_metrics`, the Microsoft Recommenders protocol) and leave-one-out
against sampled negatives (`leave_one_out_metrics`, the NCF protocol) take each user's ranked
list or the held-out item's rank; `evaluate.py` produces those from a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

USER, ITEM, RATING, PREDICTION = "user_id", "item_id", "rating", "prediction"


def mse(ratings: np.ndarray, predictions: np.ndarray) -> float:
    ratings, predictions = np.asarray(ratings, dtype=float), np.asarray(predictions, dtype=float)
    return float(np.mean((ratings - predictions) ** 2))


def _top_k(frame: pd.DataFrame, by: list[str], ascending: list[bool], k: int) -> pd.DataFrame:
    """Each user's first k rows under the given order, with their 1-based `position`."""
    ordered = frame.sort_values([USER, *by], ascending=[True, *ascending], kind="mergesort")
    position = ordered.groupby(USER, sort=False).cumcount() + 1
    return ordered.assign(position=position)[position <= k]


def _dcg(top: pd.DataFrame) -> pd.Series:
    gains = (np.power(2.0, top[RATING]) - 1.0) / np.log2(top["position"] + 1.0)
    return gains.groupby(top[USER], sort=False).sum()


def candidate_metrics(frame: pd.DataFrame, k: int = 5, threshold: float = 4.0) -> dict[str, float | int | None]:
    """MSE/RMSE over all rows and Precision@K/NDCG@K per user (candidate protocol, see module doc).
    `frame` has columns user_id, item_id, rating, prediction."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if frame.empty:
        raise ValueError("no rows to score")
    error = mse(frame[RATING], frame[PREDICTION])
    users = frame[USER].unique()
    recommended = _top_k(frame, [PREDICTION, ITEM], [False, True], k)
    hits = (recommended[RATING] >= threshold).groupby(recommended[USER]).sum()
    precision = hits.reindex(users, fill_value=0) / k
    dcg = _dcg(recommended)
    idcg = _dcg(_top_k(frame, [RATING], [False], k))
    judged = idcg[idcg > 0].index
    ndcg = (dcg.reindex(judged) / idcg.reindex(judged)) if len(judged) else pd.Series(dtype=float)
    return {
        "mse": error,
        "rmse": float(np.sqrt(error)),
        f"precision@{k}": float(precision.mean()),
        f"ndcg@{k}": float(ndcg.mean()) if len(ndcg) else None,  # None: no user had a relevant gain
        "users": int(len(users)),
    }


def ranking_metrics(recommended: list, relevant: list, k: int) -> dict[str, float | int]:
    """Per user, `recommended` is the top-k list (best first) and `relevant` the set of test items;
    every relevant item counts (binary gain). HR@K: any hit; Precision@K = hits / K; Recall@K =
    hits / relevant; NDCG@K = DCG / the DCG of min(K, relevant) hits at the top; `map@K` = the
    sum of precisions at the hits / min(K, relevant) (Microsoft Recommenders' `map_at_k` since 1.2),
    `map_all@K` = the same / relevant (their `map`). All averaged over users."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    scores: dict[str, list[float]] = {"hr": [], "precision": [], "recall": [], "ndcg": [], "map": [], "map_all": []}
    for top, truth in zip(recommended, relevant, strict=True):
        hit = np.array([item in truth for item in list(top)[:k]], dtype=float)
        precision_at = np.cumsum(hit) / np.arange(1, len(hit) + 1)
        scores["hr"].append(float(hit.any()))
        scores["precision"].append(hit.sum() / k)
        scores["recall"].append(hit.sum() / len(truth))
        scores["ndcg"].append(float((hit * discounts[:len(hit)]).sum() / discounts[:min(len(truth), k)].sum()))
        scores["map"].append(float((precision_at * hit).sum() / min(len(truth), k)))
        scores["map_all"].append(float((precision_at * hit).sum() / len(truth)))
    return {f"{name}@{k}": float(np.mean(v)) for name, v in scores.items()} | {"users": len(relevant)}


def leave_one_out_metrics(ranks, k: int = 10) -> dict[str, float | int]:
    """`ranks`: each held-out item's 0-based rank among its candidates (the NCF protocol).
    HR@K = share ranked in the top K; NDCG@K = mean of 1 / log2(rank + 2) over those, 0 elsewhere."""
    ranks = np.asarray(ranks)
    in_top = ranks < k
    return {f"hr@{k}": float(in_top.mean()),
            f"ndcg@{k}": float(np.where(in_top, 1.0 / np.log2(ranks + 2.0), 0.0).mean()), "users": len(ranks)}
