"""Splits are seeded, disjoint, complete, and leak nothing across the line they promise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusionrec.data.splits import cold_start_split, kfold, leave_one_out, random_split, sample_negatives


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    pairs = {(int(u), int(i)) for u, i in zip(rng.integers(0, 80, 3000), rng.integers(0, 120, 3000), strict=True)}
    frame = pd.DataFrame(sorted(pairs), columns=["user_id", "item_id"])
    frame["user_id"] = "u" + frame["user_id"].astype(str)
    frame["item_id"] = "i" + frame["item_id"].astype(str)
    frame["timestamp"] = rng.integers(0, 10**6, len(frame))
    return frame


def assert_partition(split, n):
    parts = [split.train, split.validation, split.test]
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n  # disjoint and complete


def test_random_split_is_70_10_20_and_seeded(ratings):
    n = len(ratings)
    split = random_split(n, seed=1)
    assert_partition(split, n)
    assert (len(split.train), len(split.validation), len(split.test)) == (round(0.7 * n), round(0.1 * n),
                                                                          n - round(0.7 * n) - round(0.1 * n))
    assert np.array_equal(random_split(n, seed=1).test, split.test)
    assert not np.array_equal(random_split(n, seed=2).test, split.test)


def test_kfold_test_parts_cover_every_rating_once(ratings):
    n = len(ratings)
    folds = kfold(n, k=5, seed=0)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests) == list(range(n))
    for fold in folds:
        assert_partition(fold, n)


def test_cold_start_holds_out_whole_users_and_items(ratings):
    split = cold_start_split(ratings, seed=0)
    assert_partition(split, len(ratings))
    train = ratings.iloc[split.train]
    for part in (split.validation, split.test):
        held = ratings.iloc[part]
        # every held-out rating has a user or an item never seen in training
        unseen = ~held["user_id"].isin(train["user_id"]) | ~held["item_id"].isin(train["item_id"])
        assert unseen.all()
    test = ratings.iloc[split.test]
    test_users = set(test["user_id"]) - set(ratings.iloc[split.validation]["user_id"]) - set(train["user_id"])
    assert test_users and not test_users & set(train["user_id"])
    assert 0.1 < len(split.test) / len(ratings) < 0.6


def test_leave_one_out_takes_each_users_latest_rating(ratings):
    split = leave_one_out(ratings, seed=0)
    assert_partition(split, len(ratings))
    test = ratings.iloc[split.test]
    assert test["user_id"].is_unique and set(test["user_id"]) == set(ratings["user_id"])
    latest = ratings.groupby("user_id")["timestamp"].max()
    assert (test.set_index("user_id")["timestamp"] == latest.reindex(test["user_id"]).to_numpy()).all()
    train = ratings.iloc[split.train]
    merged = test.merge(train, on=["user_id", "item_id"])
    assert merged.empty  # the held-out item is not in the user's training ratings


def test_leave_one_out_keeps_single_rating_users_in_training():
    frame = pd.DataFrame({"user_id": ["a", "b", "b"], "item_id": ["x", "x", "y"], "timestamp": [1, 5, 2]})
    split = leave_one_out(frame)
    assert split.test.tolist() == [1] and split.train.tolist() == [0, 2]


def test_sampled_negatives_are_never_rated(ratings):
    split = leave_one_out(ratings, seed=0)
    items = np.sort(ratings["item_id"].unique())
    negatives = sample_negatives(ratings, split.test, items, n=20, seed=0)
    rated = ratings.groupby("user_id")["item_id"].agg(set)
    assert len(negatives) == len(split.test)
    for user, sampled in negatives.items():
        assert len(set(sampled)) == 20 and not set(sampled) & rated[user]
