"""Splits are seeded, disjoint, complete, and leak nothing across the line they promise."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fusionrec.data.splits import (
    SPLITS,
    cold_items_split,
    cold_start_split,
    held_out_items,
    kfold,
    leave_one_out,
    random_split,
    sample_negatives,
    split_by_name,
    stratified_split,
)


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


def test_stratified_split_holds_out_a_quarter_of_every_user(ratings):
    split = stratified_split(ratings, seed=0)
    assert_partition(split, len(ratings))
    counts = ratings["user_id"].value_counts()
    parts = {name: ratings.iloc[getattr(split, name)]["user_id"].value_counts().reindex(counts.index, fill_value=0)
             for name in ("train", "validation", "test")}
    assert (parts["test"] == (0.25 * counts).round().clip(lower=1)).all()  # every user here has >= 2
    assert (parts["validation"] == (0.05 * counts).round()).all()
    assert (parts["train"] >= 1).all() and (parts["test"] >= 1).all()
    assert 0.24 < len(split.test) / len(ratings) < 0.26
    # no leakage: a (user, item) pair is in one part only, and the rows are the original ones
    keys = [set(map(tuple, ratings.iloc[getattr(split, name)][["user_id", "item_id"]].to_numpy()))
            for name in ("train", "validation", "test")]
    assert not (keys[0] & keys[2] or keys[1] & keys[2] or keys[0] & keys[1])


def test_stratified_split_is_seeded_and_registered(ratings):
    split = stratified_split(ratings, seed=4)
    assert np.array_equal(stratified_split(ratings, seed=4).test, split.test)
    assert np.array_equal(stratified_split(ratings.copy(), seed=4).validation, split.validation)
    assert not np.array_equal(stratified_split(ratings, seed=5).test, split.test)
    assert "stratified" in SPLITS and np.array_equal(split_by_name(ratings, "stratified", seed=4).test, split.test)


def test_stratified_split_small_users():
    # a: 1 rating (train only); b: 2 ratings (1 train, 1 test); c: 3 ratings (test 1, validation 0, train 2)
    frame = pd.DataFrame({"user_id": ["a", "b", "b", "c", "c", "c"], "item_id": list("xxyxyz")})
    for seed in range(5):
        split = stratified_split(frame, test=0.25, validation=0.05, seed=seed)
        assert_partition(split, len(frame))
        users = frame["user_id"].to_numpy()
        assert sorted(users[split.test]) == ["b", "c"] and len(split.validation) == 0
        assert sorted(users[split.train]) == ["a", "b", "c", "c"]
    # a large validation fraction still leaves one training rating per user
    split = stratified_split(frame, test=0.4, validation=0.55, seed=0)
    assert set(frame["user_id"].to_numpy()[split.train]) == {"a", "b", "c"}
    with pytest.raises(ValueError):
        stratified_split(frame, test=0.8, validation=0.3)


def test_kfold_test_parts_cover_every_rating_once(ratings):
    n = len(ratings)
    folds = kfold(n, k=5, seed=0)
    tests = np.concatenate([f.test for f in folds])
    assert sorted(tests) == list(range(n))
    for fold in folds:
        assert_partition(fold, n)


def test_kfold_carves_validation_from_each_training_part(ratings):
    n = len(ratings)
    folds = kfold(n, k=4, seed=0, validation=0.125)
    for fold in folds:
        assert_partition(fold, n)
        assert len(fold.validation) == round(0.125 * (n - len(fold.test)))
    # each fold draws its own validation slice, not a shifted copy of another fold's
    assert len(set(folds[0].validation) & set(folds[1].validation)) < len(folds[0].validation)


def test_cold_start_holds_out_whole_users_and_items(ratings):
    split = cold_start_split(ratings, seed=0)
    assert_partition(split, len(ratings))
    train = ratings.iloc[split.train]
    for part in (split.validation, split.test):
        held = ratings.iloc[part]
        # every held-out rating has a user or an item never seen in training
        unseen = ~held["user_id"].isin(train["user_id"]) | ~held["item_id"].isin(train["item_id"])
        assert unseen.all()
    # whole users and items were held out: about 30 % of each (20 % test + 10 % validation) have no
    # training rating at all, where a split by rating would leave next to none
    for column in ("user_id", "item_id"):
        cold = 1 - train[column].nunique() / ratings[column].nunique()
        assert 0.2 < cold < 0.4, (column, cold)
    assert 0.1 < len(split.test) / len(ratings) < 0.6


def test_cold_items_holds_out_a_fifth_of_the_items_whole(ratings):
    split = cold_items_split(ratings, seed=0)
    assert_partition(split, len(ratings))
    items = ratings["item_id"]
    train, validation, test = (set(items.iloc[p]) for p in (split.train, split.validation, split.test))
    # whole items: a held-out item has no training rating, and validation and test hold out their own
    assert not (train & test) and not (train & validation) and not (validation & test)
    # every rating of a held-out item went with it
    assert items.isin(test).sum() == len(split.test) and items.isin(validation).sum() == len(split.validation)
    n = items.nunique()
    assert len(test) == round(0.2 * n) and len(validation) == round(0.1 * n)
    # users are not held out: most test users also have training ratings
    users = ratings["user_id"]
    assert users.iloc[split.test].isin(users.iloc[split.train]).mean() > 0.9
    assert "cold-items" in SPLITS and split.ranks_held_out and not cold_start_split(ratings).ranks_held_out


def test_cold_items_is_seeded_and_registered(ratings):
    split = cold_items_split(ratings, seed=5)
    assert np.array_equal(split_by_name(ratings, "cold-items", seed=5).test, split.test)
    assert np.array_equal(cold_items_split(ratings, seed=5).validation, split.validation)
    other = cold_items_split(ratings, seed=6)
    assert set(ratings["item_id"].iloc[other.test]) != set(ratings["item_id"].iloc[split.test])
    with pytest.raises(ValueError, match="sum to below 1"):
        cold_items_split(ratings, validation=0.5, test=0.5)


def test_held_out_items_are_the_items_of_a_part():
    part = pd.DataFrame({"user_idx": [0, 1, 1, 2], "item_idx": [7, 3, 7, 5]})
    assert held_out_items(part).tolist() == [3, 5, 7]


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


def test_leave_one_out_validates_on_each_users_second_latest_rating(ratings):
    split = leave_one_out(ratings, seed=0)
    validation, test = ratings.iloc[split.validation], ratings.iloc[split.test]
    assert validation["user_id"].is_unique and len(validation) > 0
    second = ratings.sort_values("timestamp").groupby("user_id")["timestamp"].nth(-2)
    second = ratings.loc[second.index].set_index("user_id")["timestamp"]
    assert (validation.set_index("user_id")["timestamp"] == second.reindex(validation["user_id"]).to_numpy()).all()
    last_train = ratings.iloc[split.train].groupby("user_id")["timestamp"].max()
    assert (last_train.reindex(validation["user_id"]).to_numpy() < validation["timestamp"].to_numpy()).all()
    assert set(validation["user_id"]) <= set(test["user_id"])


def test_leave_one_out_keeps_single_rating_users_in_training():
    frame = pd.DataFrame({"user_id": ["a", "b", "b", "c", "c", "c"], "item_id": ["x", "x", "y", "x", "y", "z"],
                          "timestamp": [1, 5, 2, 9, 7, 8]})
    split = leave_one_out(frame)
    assert split.test.tolist() == [1, 3] and split.validation.tolist() == [5] and split.train.tolist() == [0, 2, 4]


def test_sampled_negatives_are_never_rated(ratings):
    split = leave_one_out(ratings, seed=0)
    items = np.sort(ratings["item_id"].unique())
    negatives = sample_negatives(ratings, split.test, items, n=20, seed=0)
    rated = ratings.groupby("user_id")["item_id"].agg(set)
    assert len(negatives) == len(split.test)
    for user, sampled in negatives.items():
        assert len(set(sampled)) == 20 and not set(sampled) & rated[user]
