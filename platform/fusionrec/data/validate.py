"""Load a dataset folder and check it against the contract, collecting every problem.

`load_dataset` is what every job calls first: it returns typed tables (ids as str, numeric
columns as float) or raises a DataError listing all problems as `FILE:ROW:COLUMN: message`.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from fusionrec.data.images import ImageProblem, open_image, resolve_image_path
from fusionrec.data.io import find_table, read_table
from fusionrec.data.problems import DataError, Problem, bad_number
from fusionrec.data.schema import DatasetSpec, TableSpec, load_spec

RATING = "rating"
TIMESTAMP = "timestamp"


@dataclass
class Dataset:
    root: Path
    spec: DatasetSpec
    users: pd.DataFrame
    items: pd.DataFrame
    ratings: pd.DataFrame

    @property
    def user_id(self) -> str:
        return self.spec.users.id

    @property
    def item_id(self) -> str:
        return self.spec.items.id

    def image_count(self) -> int:
        return sum(
            int(table[side.image].notna().sum())
            for table, side in ((self.users, self.spec.users), (self.items, self.spec.items))
            if side.image
        )

    def summary(self) -> str:
        return (
            f"{self.spec.name}: {len(self.users):,} users, {len(self.items):,} items, "
            f"{len(self.ratings):,} ratings, {self.image_count():,} images"
        )


def _rows(mask: pd.Series) -> list[int]:
    """1-based data row numbers where `mask` holds (frames carry a 0-based RangeIndex)."""
    return [int(i) + 1 for i in mask[mask].index]


def _missing(series: pd.Series) -> pd.Series:
    return series.isna() | (series.astype("string").str.strip() == "").fillna(False)


def _to_numeric(frame: pd.DataFrame, column: str, file: str, problems: list[Problem]) -> None:
    """Convert `column` to float in place; a value present but not a finite number is a problem."""
    original = frame[column]
    if pd.api.types.is_bool_dtype(original):
        original = original.astype(float)
    values = pd.to_numeric(original.astype(object).where(~_missing(original), None), errors="coerce")
    values = values.astype(float)
    bad = (~_missing(original) & values.isna()) | values.isin([float("inf"), float("-inf")])
    for row in _rows(bad):
        problems.append(Problem(file, row, column, bad_number(original.iloc[row - 1])))
    frame[column] = values


def _check_ids(frame: pd.DataFrame, column: str, file: str, problems: list[Problem]) -> None:
    ids = frame[column]
    for row in _rows(_missing(ids)):
        problems.append(Problem(file, row, column, "missing id"))
    present = ids[~_missing(ids)]
    first_row = {value: int(i) + 1 for i, value in present[~present.duplicated()].items()}
    for i, value in present[present.duplicated()].items():
        problems.append(Problem(file, int(i) + 1, column, f"duplicate id {value!r} (first at row {first_row[value]})"))


Loaded = tuple[pd.DataFrame, str]  # a table and its file name, for problem reports


def _read(root: Path, stem: str, id_columns: tuple[str, ...], problems: list[Problem]) -> Loaded | None:
    try:
        path = find_table(root, stem)
        frame = read_table(path, string_columns=id_columns).reset_index(drop=True)
    except DataError as exc:
        problems.extend(exc.problems)
        return None
    return frame, path.name


def _require_columns(frame: pd.DataFrame, columns: list[str], file: str, problems: list[Problem]) -> list[str]:
    missing = [c for c in columns if c not in frame.columns]
    problems.extend(Problem(file, None, c, "required column missing") for c in missing)
    return missing


def _load_entities(root: Path, stem: str, spec: TableSpec, problems: list[Problem]) -> Loaded | None:
    read = _read(root, stem, (spec.id,), problems)
    if read is None:
        return None
    frame, file = read
    missing = _require_columns(frame, spec.columns, file, problems)
    if spec.id in missing:
        return None
    _check_ids(frame, spec.id, file, problems)
    for column in spec.numeric:
        if column not in missing:
            _to_numeric(frame, column, file, problems)
    for column in (spec.text, *spec.categorical):
        if column and column not in missing:
            frame[column] = frame[column].astype(object).where(~_missing(frame[column]), None)
            frame[column] = frame[column].map(lambda v: v if v is None else str(v))
    return frame, file


def _load_ratings(root: Path, spec: DatasetSpec, users, items, problems: list[Problem]) -> pd.DataFrame | None:
    uid, iid = spec.users.id, spec.items.id
    read = _read(root, "ratings", (uid, iid), problems)
    if read is None:
        return None
    frame, file = read
    missing = _require_columns(frame, [uid, iid, RATING], file, problems)
    if missing:
        return None
    if frame.empty:
        problems.append(Problem(file, None, None, "the ratings table is empty"))
        return None
    for column, known in ((uid, users), (iid, items)):
        absent = _missing(frame[column])
        for row in _rows(absent):
            problems.append(Problem(file, row, column, "missing id"))
        if known is not None:
            unknown = ~absent & ~frame[column].isin(known[column])
            kind = "user" if column == uid else "item"
            for row in _rows(unknown):
                problems.append(Problem(file, row, column, f"unknown {kind} {frame[column].iloc[row - 1]!r}"))
    before = len(problems)
    _to_numeric(frame, RATING, file, problems)
    not_numbers = {p.row for p in problems[before:]}
    rating = frame[RATING]
    for row in _rows(rating.isna()):
        if row not in not_numbers:
            problems.append(Problem(file, row, RATING, "rating is missing (NaN)"))
    off = rating.notna() & ((rating < spec.rating_min) | (rating > spec.rating_max))
    for row in _rows(off):
        problems.append(
            Problem(file, row, RATING, f"rating {rating.iloc[row - 1]:g} is outside the scale "
                    f"[{spec.rating_min:g}, {spec.rating_max:g}]")
        )
    if TIMESTAMP in frame.columns and not pd.api.types.is_datetime64_any_dtype(frame[TIMESTAMP]):
        _to_numeric(frame, TIMESTAMP, file, problems)
    pairs = frame[[uid, iid]]
    duplicated = pairs.duplicated() & ~_missing(frame[uid]) & ~_missing(frame[iid])
    if duplicated.any():
        first = {key: int(i) + 1 for i, key in enumerate(zip(pairs[uid], pairs[iid], strict=True))
                 if not duplicated.iloc[i]}
        for row in _rows(duplicated):
            key = (pairs[uid].iloc[row - 1], pairs[iid].iloc[row - 1])
            problems.append(Problem(file, row, iid, f"duplicate rating of item {key[1]!r} by user {key[0]!r} "
                                                    f"(first at row {first.get(key, '?')})"))
    return frame


def _check_images(root: Path, references: list[tuple[str, int, str, str]], problems: list[Problem]) -> None:
    """Check each distinct image once, in threads (Pillow decodes without the GIL)."""
    distinct = sorted({value for *_, value in references})

    def check(value: str) -> str | None:
        try:
            open_image(resolve_image_path(root, value))
        except ImageProblem as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        results = dict(zip(distinct, tqdm(pool.map(check, distinct), total=len(distinct), desc="checking images",
                                          unit="img", disable=None, leave=False), strict=True))
    for file, row, column, value in references:
        if results[value]:
            problems.append(Problem(file, row, column, results[value]))


def validate(root: Path, check_images: bool = True) -> tuple[Dataset | None, list[Problem]]:
    """Check the dataset folder `root`; return the loaded dataset (None if invalid) and all problems."""
    root = Path(root)
    if not root.is_dir():
        return None, [Problem(str(root), None, None, "dataset folder not found")]
    try:
        spec = load_spec(root)
    except DataError as exc:
        return None, exc.problems
    problems: list[Problem] = []
    users = _load_entities(root, "users", spec.users, problems)
    items = _load_entities(root, "items", spec.items, problems)
    ratings = _load_ratings(root, spec, users and users[0], items and items[0], problems)
    if check_images:
        references = []
        for loaded, side in ((users, spec.users), (items, spec.items)):
            if loaded is None or not side.image or side.image not in loaded[0].columns:
                continue
            frame, file = loaded
            for row in _rows(~_missing(frame[side.image])):
                references.append((file, row, side.image, str(frame[side.image].iloc[row - 1])))
        _check_images(root, references, problems)
    if problems or users is None or items is None or ratings is None:
        return None, problems
    return Dataset(root, spec, users[0], items[0], ratings), []


def load_dataset(root: Path, check_images: bool = True) -> Dataset:
    """The validated dataset at `root`, or a DataError naming every problem."""
    dataset, problems = validate(root, check_images)
    if problems or dataset is None:
        raise DataError(problems)
    return dataset
