"""Seeded splits of a ratings table into train / validation / test row positions.

- `random_split`: ratings shuffled and cut 70/10/20 (the paper's 7:2 plus a validation part).
- `kfold`: k disjoint test folds covering every rating once (a validation slice carved from
  each fold's training part, if asked).
- `stratified_split`: per user, 75 % of the ratings to train and 25 % to test (the Microsoft
  Recommenders protocol), with a validation slice carved from each user's train part.
- `cold_start_split`: whole users and whole items held out, so none of them is seen in training.
- `cold_items_split`: whole items only (20 % to test, 10 % to validation, each with all its
  ratings); users stay warm, and each test user ranks the held-out items.
- `leave_one_out`: each user's latest rating is the test (the NCF protocol) and the second-latest
  the validation, with
  `sample_negatives` drawing the items a user never rated to rank it against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EMPTY = np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class Split:
    """Row positions (into the ratings table) of each part; parts are disjoint. `ranks_held_out`:
    the split holds out whole items, and full ranking over its validation or test part ranks only
    that part's held-out items (`held_out_items`), not the whole catalogue (cold-items)."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    ranks_held_out: bool = False

    @property
    def fitted(self) -> np.ndarray:
        """Train + validation: every rating the model saw (what ranking and serving leave out)."""
        return np.concatenate([self.train, self.validation])


def random_split(n_ratings: int, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), seed: int = 0) -> Split:
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(n_ratings)
    n_train = int(round(fractions[0] * n_ratings))
    n_validation = int(round(fractions[1] * n_ratings))
    cut = n_train + n_validation
    return Split(np.sort(order[:n_train]), np.sort(order[n_train:cut]), np.sort(order[cut:]))


def kfold(n_ratings: int, k: int = 5, seed: int = 0, validation: float = 0.0) -> list[Split]:
    """k splits whose test parts partition all ratings; the rest of each is its training part, less
    a seeded `validation` fraction of it carved out to choose epochs on."""
    if not 2 <= k <= n_ratings:
        raise ValueError(f"k must be between 2 and the number of ratings ({n_ratings}), got {k}")
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be in [0, 1), got {validation}")
    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(n_ratings), k)
    splits = []
    for i, fold in enumerate(folds):
        rest = rng.permutation(np.concatenate(folds[:i] + folds[i + 1:]))
        cut = int(round(validation * len(rest)))
        splits.append(Split(np.sort(rest[cut:]), np.sort(rest[:cut]), np.sort(fold)))
    return splits


def stratified_split(
    ratings: pd.DataFrame,
    user_col: str = "user_id",
    test: float = 0.25,
    validation: float = 0.05,
    seed: int = 0,
) -> Split:
    """Per user (as Microsoft Recommenders' `python_stratified_split(filter_by="user")`): shuffle
    the user's n ratings and hold out round(test * n) of them for test, but always keep at least one
    in train and, when n >= 2, put at least one in test. Then round(validation * n) of the user's
    remaining ratings go to validation while at least one stays in train; so train + validation is
    the 75 % that Microsoft Recommenders trains on, and validation only picks the best epoch.
    Users with a single rating keep it in train."""
    if min(validation, test) < 0 or validation + test >= 1:
        raise ValueError("validation and test fractions must be non-negative and sum to below 1")
    rng = np.random.default_rng(seed)
    users = ratings[user_col].to_numpy()
    order = np.lexsort((rng.random(len(users)), users))  # grouped by user, shuffled within each
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    rank = np.arange(len(users)) - np.repeat(starts, counts)  # position within the user's shuffle
    n = np.repeat(counts, counts)
    n_test = np.where(n >= 2, np.clip(np.round(test * n), 1, n - 1), 0)
    n_validation = np.clip(np.round(validation * n), 0, np.maximum(n - n_test - 1, 0))
    in_test = rank < n_test
    in_validation = ~in_test & (rank < n_test + n_validation)
    in_train = ~in_test & ~in_validation
    return Split(np.sort(order[in_train]), np.sort(order[in_validation]), np.sort(order[in_test]))


def _hold_out(ids: pd.Series, validation: float, test: float, rng: np.random.Generator) -> tuple[set, set]:
    distinct = np.sort(ids.unique())
    order = rng.permutation(len(distinct))
    n_test, n_validation = int(round(test * len(distinct))), int(round(validation * len(distinct)))
    return set(distinct[order[:n_test]]), set(distinct[order[n_test:n_test + n_validation]])


def cold_start_split(
    ratings: pd.DataFrame,
    user_col: str = "user_id",
    item_col: str = "item_id",
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> Split:
    """Hold out `test` (and `validation`) of the users and of the items, whole. A rating goes to
    test if its user or item is a test one, else to validation if either is a validation one,
    else to train: no held-out user or item has a single training rating."""
    if min(validation, test) < 0 or validation + test >= 1:
        raise ValueError("validation and test fractions must be non-negative and sum to below 1")
    rng = np.random.default_rng(seed)
    test_users, validation_users = _hold_out(ratings[user_col], validation, test, rng)
    test_items, validation_items = _hold_out(ratings[item_col], validation, test, rng)
    users, items = ratings[user_col], ratings[item_col]
    in_test = (users.isin(test_users) | items.isin(test_items)).to_numpy()
    in_validation = ~in_test & (users.isin(validation_users) | items.isin(validation_items)).to_numpy()
    positions = np.arange(len(ratings))
    return Split(positions[~in_test & ~in_validation], positions[in_validation], positions[in_test])


def cold_items_split(
    ratings: pd.DataFrame,
    item_col: str = "item_id",
    validation: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
) -> Split:
    """Hold out a seeded `test` fraction of the distinct items and, disjoint from them, a `validation`
    fraction, each with every one of its ratings; the other items' ratings are the training part.
    Validation is carved the same way as test (items, not ratings), so choosing an epoch or a model
    on it is itself a cold-item problem, and test is never consulted for it. No held-out item has a
    training rating; a user may have ratings in all three parts (users are not held out).
    Full ranking over a part ranks only that part's held-out items (`Split.ranks_held_out`)."""
    if min(validation, test) < 0 or validation + test >= 1:
        raise ValueError("validation and test fractions must be non-negative and sum to below 1")
    test_items, validation_items = _hold_out(ratings[item_col], validation, test, np.random.default_rng(seed))
    items = ratings[item_col]
    in_test = items.isin(test_items).to_numpy()
    in_validation = items.isin(validation_items).to_numpy()
    positions = np.arange(len(ratings))
    return Split(positions[~in_test & ~in_validation], positions[in_validation], positions[in_test],
                 ranks_held_out=True)


def held_out_items(part: pd.DataFrame, item_col: str = "item_idx") -> np.ndarray:
    """The items a part of a cold-items split holds out: every item with a rating in it (sorted)."""
    return np.unique(part[item_col].to_numpy())


def leave_one_out(
    ratings: pd.DataFrame, user_col: str = "user_id", time_col: str | None = "timestamp", seed: int = 0
) -> Split:
    """Each user's latest rating (by `time_col`; ties and missing times broken at random) is the test
    and the second-latest the validation (as RecBole does), so the epoch is never chosen on test.
    A user keeps at least one rating in training: with two ratings there is no validation one,
    with a single rating there is no test one either."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"user": ratings[user_col].to_numpy(), "tiebreak": rng.random(len(ratings))})
    frame["time"] = ratings[time_col].to_numpy() if time_col and time_col in ratings else 0.0
    frame["position"] = np.arange(len(ratings))
    ordered = frame.sort_values(["user", "time", "tiebreak"], kind="mergesort")
    from_last = ordered.groupby("user", sort=False).cumcount(ascending=False)  # 0 = the latest
    count = ordered.groupby("user", sort=False)["user"].transform("size")
    in_test = (from_last == 0) & (count >= 2)
    in_validation = (from_last == 1) & (count >= 3)
    positions = ordered["position"]
    return Split(np.sort(positions[~in_test & ~in_validation].to_numpy()),
                 np.sort(positions[in_validation].to_numpy()), np.sort(positions[in_test].to_numpy()))


def sample_negatives(
    ratings: pd.DataFrame,
    test: np.ndarray,
    all_items: np.ndarray,
    n: int = 99,
    user_col: str = "user_id",
    item_col: str = "item_id",
    seed: int = 0,
) -> dict[object, np.ndarray]:
    """For each test row's user, `n` distinct items that user never rated (in any split)."""
    rng = np.random.default_rng(seed)
    all_items = np.asarray(all_items)
    rated = ratings.groupby(user_col)[item_col].agg(set)
    negatives: dict[object, np.ndarray] = {}
    for user in ratings[user_col].to_numpy()[test]:
        candidates = all_items[~np.isin(all_items, list(rated[user]))]
        if len(candidates) < n:
            raise ValueError(f"user {user!r} has only {len(candidates)} unrated items, fewer than {n}")
        negatives[user] = rng.choice(candidates, size=n, replace=False)
    return negatives


SPLITS = ("random", "stratified", "cold-start", "cold-items", "loo")


def split_by_name(ratings: pd.DataFrame, name: str, seed: int = 0) -> Split:
    """The split a training run names: `random`, `stratified`, `cold-start`, `cold-items` or `loo`
    (ratings need user_id, item_id)."""
    if name == "random":
        return random_split(len(ratings), seed=seed)
    if name == "stratified":
        return stratified_split(ratings, seed=seed)
    if name == "cold-start":
        return cold_start_split(ratings, seed=seed)
    if name == "cold-items":
        return cold_items_split(ratings, seed=seed)
    if name == "loo":
        return leave_one_out(ratings, time_col="timestamp" if "timestamp" in ratings else None, seed=seed)
    raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
