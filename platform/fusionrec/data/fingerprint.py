"""Content fingerprints: what a model was trained on, so that like is compared with like.

- `data_fingerprint`: the users, items and ratings tables as loaded (row order included: the
  splits are drawn over row positions). The same content read from CSV or Parquet gives the same
  fingerprint; any changed rating, id or attribute gives another.
- `features_fingerprint`: the bytes of the feature tables a model read (text/image embeddings).

A model's validation metric is only comparable with another's when both fingerprints, the split
and the objective agree (see registry.promotion).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from fusionrec.data.validate import Dataset


def _frame_digest(frame: pd.DataFrame) -> bytes:
    # Values as text: a column read as int64 from Parquet and as str from CSV hashes the same.
    text = frame.astype(str).fillna("")
    return hashlib.sha256(pd.util.hash_pandas_object(text, index=False).to_numpy().tobytes()
                          + "\x1f".join(map(str, frame.columns)).encode()).digest()


def data_fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for frame in (dataset.users, dataset.items, dataset.ratings):
        digest.update(_frame_digest(frame))
    return digest.hexdigest()[:16]


def features_fingerprint(folder: Path | None) -> str:
    """Over the users.*/items.* feature tables in `folder` ("none" without features)."""
    if folder is None:
        return "none"
    digest = hashlib.sha256()
    tables = sorted(path for side in ("users", "items") for path in Path(folder).glob(f"{side}.*.parquet"))
    for path in tables:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]
