"""The dataset contract: `dataset.yaml` says what the columns of users, items and ratings mean.

    name: my-shop
    rating_scale: {min: 1, max: 5}
    relevance_threshold: 4          # a rating >= this counts as relevant in ranking metrics
    users:
      id: user_id
      text: self_intro              # optional: one free-text column
      image: photo                  # optional: paths relative to the dataset folder
      categorical: [gender, region] # one-hot encoded by the models
      numeric: [age]                # numbers; missing values allowed
    items: {id: item_id, text: description, image: image, categorical: [brand], numeric: [price]}
    truth: {...}                    # optional, written by generators that know the answer

The tables live beside it as users/items/ratings, each `.parquet` or `.csv`. Ratings hold
user_id, item_id, rating and optionally timestamp (the users'/items' id column names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusionrec.data.problems import DataError, Problem

SPEC_FILE = "dataset.yaml"
TOP_LEVEL_KEYS = {"name", "description", "rating_scale", "relevance_threshold", "users", "items", "truth", "source"}
TABLE_KEYS = {"id", "text", "image", "categorical", "numeric"}


@dataclass(frozen=True)
class TableSpec:
    """What the columns of a users or items table are."""

    id: str
    text: str | None = None
    image: str | None = None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()

    @property
    def columns(self) -> list[str]:
        named = [self.id, self.text, self.image, *self.categorical, *self.numeric]
        return [c for c in named if c]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.text:
            out["text"] = self.text
        if self.image:
            out["image"] = self.image
        out["categorical"] = list(self.categorical)
        out["numeric"] = list(self.numeric)
        return out


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    rating_min: float
    rating_max: float
    relevance_threshold: float
    users: TableSpec
    items: TableSpec
    truth: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "rating_scale": {"min": self.rating_min, "max": self.rating_max},
            "relevance_threshold": self.relevance_threshold,
            "users": self.users.to_dict(),
            "items": self.items.to_dict(),
        }
        if self.source:
            out["source"] = self.source
        if self.truth:
            out["truth"] = self.truth
        return out

    def write(self, folder: Path) -> None:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        (Path(folder) / SPEC_FILE).write_text(text, encoding="utf-8")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _table_spec(raw: Any, side: str, problems: list[Problem]) -> TableSpec | None:
    def problem(key: str, message: str) -> None:
        problems.append(Problem(SPEC_FILE, None, f"{side}.{key}" if key else side, message))

    if not isinstance(raw, dict):
        problem("", "must be a mapping with at least `id`")
        return None
    for key in sorted(set(raw) - TABLE_KEYS):
        problem(key, f"unknown key (expected one of {', '.join(sorted(TABLE_KEYS))})")
    id_column = raw.get("id")
    if not isinstance(id_column, str) or not id_column:
        problem("id", "required: the name of the id column")
        return None
    single: dict[str, str | None] = {}
    for key in ("text", "image"):
        value = raw.get(key)
        if value is not None and not (isinstance(value, str) and value):
            problem(key, "must be a column name")
            value = None
        single[key] = value
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("categorical", "numeric"):
        value = raw.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            problem(key, "must be a list of column names")
            value = []
        lists[key] = tuple(value)
    spec = TableSpec(id_column, single["text"], single["image"], lists["categorical"], lists["numeric"])
    seen: set[str] = set()
    for column in spec.columns:
        if column in seen:
            problem("", f"column {column!r} is given more than one role")
        seen.add(column)
    return spec


def parse_spec(raw: Any) -> tuple[DatasetSpec | None, list[Problem]]:
    """Check a loaded `dataset.yaml` and build its spec; every problem is returned, none raised."""
    problems: list[Problem] = []

    def problem(key: str | None, message: str) -> None:
        problems.append(Problem(SPEC_FILE, None, key, message))

    if not isinstance(raw, dict):
        problem(None, "must be a YAML mapping")
        return None, problems
    for key in sorted(set(raw) - TOP_LEVEL_KEYS):
        problem(key, f"unknown key (expected one of {', '.join(sorted(TOP_LEVEL_KEYS))})")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problem("name", "required: the dataset's name")
    scale = raw.get("rating_scale")
    low = high = None
    if not isinstance(scale, dict):
        problem("rating_scale", "required: {min: ..., max: ...}")
    else:
        low, high = _number(scale.get("min")), _number(scale.get("max"))
        if low is None or high is None:
            problem("rating_scale", "min and max must both be finite numbers")
        elif low >= high:
            problem("rating_scale", f"min ({low:g}) must be below max ({high:g})")
            low = high = None
    threshold = _number(raw.get("relevance_threshold"))
    if threshold is None:
        problem("relevance_threshold", "required: a finite number")
    elif low is not None and high is not None and not low <= threshold <= high:
        problem("relevance_threshold", f"{threshold:g} is outside the rating scale [{low:g}, {high:g}]")
    users = _table_spec(raw.get("users"), "users", problems)
    items = _table_spec(raw.get("items"), "items", problems)
    truth = raw.get("truth") or {}
    if not isinstance(truth, dict):
        problem("truth", "must be a mapping")
    if problems:
        return None, problems
    spec = DatasetSpec(
        name=name,
        rating_min=low,
        rating_max=high,
        relevance_threshold=threshold,
        users=users,
        items=items,
        truth=truth,
        source=raw.get("source"),
    )
    return spec, []


def load_spec(folder: Path) -> DatasetSpec:
    """Read and check `folder/dataset.yaml`; a DataError lists every problem."""
    path = Path(folder) / SPEC_FILE
    if not path.is_file():
        raise DataError([Problem(SPEC_FILE, None, None, "file not found")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        message = f"not valid YAML: {getattr(exc, 'problem', None) or exc}".splitlines()[0]
        raise DataError([Problem(SPEC_FILE, None if line is None else line + 1, None, message)]) from exc
    spec, problems = parse_spec(raw)
    if problems:
        raise DataError(problems)
    return spec
