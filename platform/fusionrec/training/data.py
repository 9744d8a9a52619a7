"""The data of a run: the dataset and its feature tables loaded, ratings index-coded and split
(`prepare`), and the part of it that training and validation may see (`loop_data`: one copy in
the object store for every worker or trial; the test part never reaches one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrec.data.fingerprint import data_fingerprint, features_fingerprint
from fusionrec.data.splits import Split, split_by_name
from fusionrec.data.validate import Dataset, load_dataset
from fusionrec.evaluate import index_ratings, ranking_candidates
from fusionrec.models.content import SideContent, build_side
from fusionrec.training.config import TrainConfig


@dataclass
class Prepared:
    dataset: Dataset
    users: SideContent
    items: SideContent
    ratings: pd.DataFrame  # user_idx, item_idx, user_id, item_id, rating (RangeIndex = split positions)
    split: Split
    fingerprints: dict[str, str]  # "data", "features" (see data/fingerprint.py)

    def part(self, name: str) -> pd.DataFrame:
        """The ratings of one part of the split: "train", "validation" or "test"."""
        return self.ratings.iloc[getattr(self.split, name)]


def prepare(cfg: TrainConfig, pixels: bool = False) -> Prepared:
    """Load and index the data of a run and draw its split. Raw pixels are read for the CNN baseline
    (or with `pixels`, for runs of several models); every other model reads the encoded features."""
    dataset = load_dataset(Path(cfg.dataset), check_images=False)
    features = Path(cfg.features) if cfg.features else None
    pixels_root = dataset.root if cfg.model.model == "cnn" or pixels else None
    users = build_side(dataset.users, dataset.spec.users, "users", features, pixels_root)
    items = build_side(dataset.items, dataset.spec.items, "items", features, pixels_root)
    ratings = index_ratings(dataset, users.ids, items.ids)
    split = split_by_name(ratings, cfg.split, cfg.seed)
    if not len(split.validation):
        raise ValueError(f"the {cfg.split} split of {cfg.dataset} leaves no validation ratings to select on")
    fingerprints = {"data": data_fingerprint(dataset), "features": features_fingerprint(features)}
    return Prepared(dataset, users, items, ratings, split, fingerprints)


@dataclass
class LoopData:
    """What each training worker or Tune trial needs besides its batches (one copy in the object store)."""

    users: SideContent
    items: SideContent
    train: pd.DataFrame  # user_idx, item_idx, rating of the training part (left out when ranking for validation)
    validation: pd.DataFrame  # user_idx, item_idx, rating
    validation_candidates: np.ndarray | None = None  # what validation ranks (None: every item; cold-items)

    def train_mean(self, objective: str) -> float:
        """The training part's mean rating under the rating objective (a model's `global_mean`), else 0."""
        return float(self.train["rating"].mean()) if objective == "rating" else 0.0


def loop_data(users: SideContent, items: SideContent, ratings: pd.DataFrame, split: Split) -> LoopData:
    """The training and validation parts only: the test part never reaches a worker or a trial."""
    columns = ["user_idx", "item_idx", "rating"]
    validation = ratings.iloc[split.validation][columns].reset_index(drop=True)
    return LoopData(users, items, ratings.iloc[split.train][columns].reset_index(drop=True), validation,
                    ranking_candidates(split, validation))
