"""How low can a model of the synthetic shop go, given what the encoders carry? Two ridge
regressions of the rating on the generator's own terms — id biases, the structured crosses, and one
"user's favourite == item's level" indicator per text/image factor — fitted on the training split
and scored on the test split of `fusionrec train`'s random split:

- `true`:    the indicators from the hidden factor levels (replayed from dataset.yaml's generator);
- `decoded`: the same indicators from the levels a logistic probe reads off each side's text or
             image embedding (5-fold, out of fold: every level is predicted by a probe that never
             saw it). A recommender never sees the levels, so this is an optimistic ceiling for any
             model that matches content through these embeddings.
- `decoded + tastes`: `decoded` plus each user's own weight for every decoded item level, learned
             from their training ratings: what recovering mis-read favourites from ratings can add.

It first prints the probe's out-of-fold accuracy for every factor on each side (how much of each
stated taste and each item level the embeddings carry).

    .venv/bin/python benchmarks/shop_ceiling.py SHOP --features FEATURES [--seeds 0,1,2]
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
import typer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import cross_val_predict

from fusionrec.data.schema import load_spec
from fusionrec.data.synth import IMAGE_FACTORS, TEXT_FACTORS, SynthConfig, draw_entities, entity_ids
from fusionrec.encoders.pipeline import embedding_matrix, feature_path, read_features
from fusionrec.models.layers import set_mean
from fusionrec.training.config import TrainConfig
from fusionrec.training.data import prepare


def _embeddings(features: str, side: str, kind: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The z-scored embeddings in generator order, and which entities have the text/image. A
    sentence set is read as the mean of its vectors (what `--chunk-pooling mean` stores)."""
    frame, meta = read_features(feature_path(features, side, kind))
    position = {i: k for k, i in enumerate(frame["id"])}
    rows = [position[i] for i in ids]
    x = set_mean(torch.from_numpy(embedding_matrix(frame)), meta.get("set_size", 1)).numpy()[rows]
    present = frame["mask"].to_numpy()[rows] > 0
    return (x - x[present].mean(0)) / (x[present].std(0) + 1e-6), present


def _decoded(x: np.ndarray, present: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Out-of-fold probe predictions of `levels` (one per entity); -1 where the entity has no text/image."""
    out = np.full(len(levels), -1)
    out[present] = cross_val_predict(LogisticRegression(C=0.1, max_iter=2000), x[present], levels[present], cv=5)
    return out


def _onehot(codes: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix((np.ones(len(codes)), (np.arange(len(codes)), codes)), shape=(len(codes), codes.max() + 1))


def _matches(levels: dict, factors: list[str], u: np.ndarray, i: np.ndarray) -> sp.csr_matrix:
    """Per rating and factor: 1 where the user's favourite level is the item's level."""
    return sp.csr_matrix(np.stack([levels[("users", f)][u] == levels[("items", f)][i] for f in factors], 1)
                         .astype(float))


def _tastes(users: np.ndarray, levels: np.ndarray, n_users: int) -> sp.csr_matrix:
    """One column per (user, item level): 1 where the rated item has that level (-1: unknown, none)."""
    n_levels, known = max(len(v) for v in {**TEXT_FACTORS, **IMAGE_FACTORS}.values()), levels >= 0
    return sp.csr_matrix((known.astype(float), (np.arange(len(users)), users * n_levels + np.maximum(levels, 0))),
                         shape=(len(users), n_users * n_levels))


def main(shop: str, features: str = typer.Option(...), seeds: str = "0,1,2") -> None:
    spec = load_spec(shop)
    generator = SynthConfig(**spec.truth["generator"])
    users, items = draw_entities(generator, np.random.default_rng(generator.seed))
    user_ids, item_ids = entity_ids("u", generator.users).astype(str), entity_ids("i", generator.items).astype(str)
    factors = [("text", f) for f in TEXT_FACTORS] + [("image", f) for f in IMAGE_FACTORS]
    names = [f for _, f in factors]
    decoded = {}
    for side, ids, table in (("users", user_ids, users), ("items", item_ids, items)):
        for kind in ("text", "image"):
            x, present = _embeddings(features, side, kind, ids)
            decoded |= {(side, f): _decoded(x, present, table[f]) for k, f in factors if k == kind}
    # How much of each factor the embeddings carry: the probe's out-of-fold accuracy
    for side, table in (("users", users), ("items", items)):
        accuracy = {f: np.mean(decoded[(side, f)][decoded[(side, f)] >= 0] == table[f][decoded[(side, f)] >= 0])
                    for f in names}
        print(f"probe accuracy, {side}: " + ", ".join(f"{f} {a:.1%}" for f, a in accuracy.items()), flush=True)
    true_levels = {(side, f): table[f] for side, table in (("users", users), ("items", items)) for f in names}
    results: dict[str, list[float]] = {"true": [], "decoded": [], "decoded + tastes": []}
    for seed in seeds.split(","):
        prepared = prepare(TrainConfig(dataset=shop, features=features, seed=int(seed)))
        ratings, split = prepared.ratings, prepared.split
        # rows of the generator's arrays for every rating (ids are u00001... in generator order)
        u = np.searchsorted(user_ids, prepared.users.ids[ratings["user_idx"].to_numpy()])
        i = np.searchsorted(item_ids, prepared.items.ids[ratings["item_idx"].to_numpy()])
        age, loyalty = np.digitize(users["age"], [25, 35, 45]), np.digitize(users["years_registered"], [2, 5, 10])
        crosses = [age[u] * 4 + items["age_range"][i], users["region"][u] * 4 + items["sleeve"][i],
                   users["region"][u] * 12 + items["brand"][i], loyalty[u] * 4 + items["price_band"][i]]
        base = [_onehot(ratings["user_idx"].to_numpy()), _onehot(ratings["item_idx"].to_numpy()),
                *(_onehot(c) for c in crosses)]
        y = ratings["rating"].to_numpy(float)
        # the 0.5 loosens the ridge on these columns (~44 a user) against the rest
        tastes = sp.hstack([_tastes(u, decoded[("items", f)][i], generator.users) for f in names]) * 0.5
        designs = {"true": [_matches(true_levels, names, u, i)], "decoded": [_matches(decoded, names, u, i)]}
        designs["decoded + tastes"] = [*designs["decoded"], tastes]
        for name, extra in designs.items():
            x = sp.hstack([*base, *extra]).tocsr()
            fit = Ridge(alpha=3.0 if name == "decoded + tastes" else 1.0).fit(x[split.train], y[split.train])
            results[name].append(float(np.mean((np.clip(fit.predict(x[split.test]), 1, 5) - y[split.test]) ** 2)))
        print(f"seed {seed}: " + ", ".join(f"{name} {values[-1]:.4f}" for name, values in results.items()), flush=True)
    floor = spec.truth["bayes_mse"]
    for name, values in results.items():
        print(f"{name:16s} test MSE {np.mean(values):.4f} ± {np.std(values):.4f}  ({np.mean(values) / floor:.2f}× the "
              f"Bayes floor {floor:.4f})")


if __name__ == "__main__":
    typer.run(main)
