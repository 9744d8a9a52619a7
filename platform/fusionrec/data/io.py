"""Reading tables (CSV or Parquet) and writing files and folders atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fusionrec.data.problems import DataError, Problem

TABLE_SUFFIXES = (".parquet", ".csv")


def is_missing(value: object) -> bool:
    """An empty cell: None, NaN or blank text."""
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


def find_table(root: Path, stem: str) -> Path:
    """The one file `<stem>.parquet` or `<stem>.csv` in `root`; a DataError if none or both."""
    found = [root / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES if (root / f"{stem}{suffix}").is_file()]
    if not found:
        raise DataError([Problem(f"{stem}.parquet", None, None, f"file not found (nor {stem}.csv)")])
    if len(found) > 1:
        raise DataError([Problem(found[0].name, None, None, f"both {found[0].name} and {found[1].name} exist")])
    return found[0]


def read_table(path: Path, string_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read a CSV or Parquet table. In CSVs every column is read as text, so that ids keep their
    leading zeros and a stray word in a numeric column is reported rather than silently parsed;
    callers convert the columns they declare numeric. `string_columns` are cast to str in both."""
    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=True)
        else:
            frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a data problem, not a crash
        raise DataError([Problem(path.name, None, None, f"cannot read table: {exc}".splitlines()[0])]) from exc
    for column in string_columns:
        if column in frame.columns:
            frame[column] = frame[column].astype("string").astype(object).where(frame[column].notna(), None)
    return frame


@contextlib.contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it replaces `out` in one rename.
    On failure the temporary folder is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
