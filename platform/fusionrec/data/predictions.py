"""Predictions tables (user_id, item_id, rating, prediction) as scored by `fusionrec metrics`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from fusionrec.data.problems import DataError, Problem, bad_number

COLUMNS = ("user_id", "item_id", "rating", "prediction")


def load_predictions(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet predictions table; a DataError names every bad file/row/column."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise DataError([Problem(str(path), None, None, "file not found")])
    if path.suffix not in (".csv", ".parquet"):
        raise DataError([Problem(name, None, None, "expected a .csv or .parquet file")])
    try:
        # Default type inference: numeric ids sort as numbers when ties are broken by item_id.
        frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parser failure is the file's problem
        raise DataError([Problem(name, None, None, f"cannot read table: {exc}".splitlines()[0])]) from exc
    frame = frame.reset_index(drop=True)
    problems = [Problem(name, None, c, "required column missing") for c in COLUMNS if c not in frame.columns]
    if problems:
        raise DataError(problems)
    if frame.empty:
        raise DataError([Problem(name, None, None, "no rows")])
    for column in ("user_id", "item_id"):
        for i in frame.index[frame[column].isna()]:
            problems.append(Problem(name, int(i) + 1, column, "missing id"))
    for column in ("rating", "prediction"):
        values = pd.to_numeric(frame[column], errors="coerce").astype(float)
        for i in frame.index[~values.map(math.isfinite)]:
            problems.append(Problem(name, int(i) + 1, column, bad_number(frame[column].iloc[i])))
        frame[column] = values
    if problems:
        raise DataError(sorted(problems, key=lambda p: (p.row or 0, p.column or "")))
    return frame[list(COLUMNS)]
