"""Per-side content matrices that the models read: text and image embeddings (from the feature
tables), structured one-hots and standardised numbers, and hashed bag-of-words.

Row `n` of every matrix (one past the last known user or item) is the "unknown" row: all zeros.
It stands for an entity never seen in training; serving fills it from a cold-start payload.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fusionrec.data.io import is_missing
from fusionrec.data.schema import TableSpec

BAG_OF_WORDS_DIM = 512
PIXELS = 32  # side of the raw images the CNN baseline reads
WORD = re.compile(r"[a-z0-9']+")


@dataclass
class StructuredEncoder:
    """One-hot for categorical columns (levels seen in the table), z-scores for numeric ones
    (missing -> 0, the mean). Fitted on a users or items table, reused for cold-start payloads."""

    categorical: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, table: pd.DataFrame, spec: TableSpec) -> StructuredEncoder:
        categorical = {c: sorted(str(v) for v in table[c].dropna().unique()) for c in spec.categorical}
        numeric = {}
        for c in spec.numeric:
            values = table[c].astype(float)
            std = float(values.std()) if values.notna().sum() > 1 else 0.0
            numeric[c] = (float(values.mean()) if values.notna().any() else 0.0, std if std > 0 else 1.0)
        return cls(categorical, numeric)

    @property
    def dim(self) -> int:
        return sum(len(levels) for levels in self.categorical.values()) + len(self.numeric)

    def transform(self, table: pd.DataFrame) -> np.ndarray:
        parts = []
        for column, levels in self.categorical.items():
            index = {level: k for k, level in enumerate(levels)}
            onehot = np.zeros((len(table), len(levels)), np.float32)
            codes = [index.get(str(v), -1) if v is not None and not pd.isna(v) else -1 for v in table[column]]
            rows = [r for r, c in enumerate(codes) if c >= 0]
            onehot[rows, [codes[r] for r in rows]] = 1.0
            parts.append(onehot)
        for column, (mean, std) in self.numeric.items():
            values = ((table[column].astype(float) - mean) / std).fillna(0.0).to_numpy(np.float32)
            parts.append(values[:, None])
        return np.concatenate(parts, axis=1) if parts else np.zeros((len(table), 0), np.float32)

    def to_dict(self) -> dict:
        return {"categorical": self.categorical, "numeric": {k: list(v) for k, v in self.numeric.items()}}

    @classmethod
    def from_dict(cls, raw: dict) -> StructuredEncoder:
        return cls(raw["categorical"], {k: tuple(v) for k, v in raw["numeric"].items()})


def bag_of_words(texts, dim: int = BAG_OF_WORDS_DIM) -> np.ndarray:
    """Hashed, L2-normalised word counts: [len(texts), dim]. crc32 keeps buckets stable across runs."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, text in enumerate(texts):
        if is_missing(text):
            continue
        for word in WORD.findall(str(text).lower()):
            out[row, zlib.crc32(word.encode()) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms > 0, norms, 1.0)


@dataclass
class SideContent:
    """Everything the models know about one side (users or items), row-aligned with `ids`,
    plus one trailing all-zero "unknown" row."""

    ids: np.ndarray
    text: np.ndarray  # [n + 1, text_dim]   (text_dim 0: no text)
    image: np.ndarray  # [n + 1, image_dim]
    structured: np.ndarray  # [n + 1, structured_dim]
    words: np.ndarray  # [n + 1, BAG_OF_WORDS_DIM]
    encoder: StructuredEncoder
    pixels: np.ndarray | None = None  # [n + 1, 3 * PIXELS * PIXELS] in [0, 1], only for the CNN baseline
    text_set: int = 1  # > 1: each text row is that many sentence vectors side by side (encode's `set`)

    @property
    def n(self) -> int:
        return len(self.ids)

    def arrays(self) -> dict[str, np.ndarray]:
        pixels = self.pixels if self.pixels is not None else np.zeros((self.n + 1, 0), np.float32)
        return {"text": self.text, "image": self.image, "structured": self.structured, "words": self.words,
                "pixels": pixels}


def row_index(ids) -> dict[str, int]:
    """Each id, as a string, -> its row in a side's matrices: the one id-to-row map everything uses."""
    return {str(x): k for k, x in enumerate(ids)}


def rows_of(ids: pd.Series, index: dict[str, int]) -> np.ndarray:
    """The rows of `ids` under `index`; an id it does not know -> len(index), the unknown row."""
    return ids.astype(str).map(index).fillna(len(index)).to_numpy(np.int64)


def _with_unknown_row(matrix: np.ndarray) -> np.ndarray:
    return np.concatenate([matrix, np.zeros((1, matrix.shape[1]), np.float32)]).astype(np.float32)


def _embeddings(features: Path | None, side: str, kind: str, ids: np.ndarray, column: str,
                values: list) -> tuple[np.ndarray, int]:
    """The feature table's embeddings aligned to `ids` (rows with mask 0 stay zero), and its set
    size (1 unless the texts are sentence sets). Width 0 without a features folder, or for a column
    empty everywhere (encode writes no table for it); otherwise the table must be there: a model
    must not quietly train without a declared modality."""
    from fusionrec.encoders.pipeline import embedding_matrix, feature_path, read_features

    if features is None or all(is_missing(v) for v in values):
        return np.zeros((len(ids), 0), np.float32), 1
    path = feature_path(features, side, kind)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature table, but the {side} have {kind} ({column!r}); "
                                f"run `fusionrec encode` on this dataset with --out {features}")
    frame, meta = read_features(path)
    matrix = embedding_matrix(frame) * frame["mask"].to_numpy(np.float32)[:, None]
    position = row_index(frame["id"])
    missing = [i for i in ids if i not in position]
    if missing:
        raise ValueError(f"{path}: no features for {len(missing)} {side} (e.g. {missing[0]!r}); run `fusionrec encode`")
    return matrix[[position[i] for i in ids]], int(meta.get("set_size", 1))


def raw_pixels(root: Path, paths) -> np.ndarray:
    """Images downscaled to PIXELS x PIXELS, flattened, in [0, 1]; missing or unusable -> zeros."""
    from fusionrec.data.images import ImageProblem, open_image, resolve_image_path

    out = np.zeros((len(paths), 3 * PIXELS * PIXELS), np.float32)
    for row, value in enumerate(paths):
        if is_missing(value):
            continue
        try:
            out[row] = image_pixels(open_image(resolve_image_path(root, str(value))))
        except ImageProblem:
            continue
    return out


def image_pixels(image) -> np.ndarray:
    """An RGB PIL image as the CNN baseline reads it: PIXELS x PIXELS, channels first, flat, in [0, 1]."""
    small = image.resize((PIXELS, PIXELS))
    return (np.asarray(small, np.float32) / 255.0).transpose(2, 0, 1).reshape(-1)


def build_side(table: pd.DataFrame, spec: TableSpec, side: str, features: Path | None,
               images_root: Path | None = None) -> SideContent:
    """`features`: the folder of `fusionrec encode`'s tables (None: no text/image embeddings).
    `images_root` given: also load raw pixels (for the CNN baseline)."""
    if features is not None and not Path(features).is_dir():
        raise FileNotFoundError(f"{features}: no such features folder; make it with `fusionrec encode`")
    ids = table[spec.id].astype(str).to_numpy()
    encoder = StructuredEncoder.fit(table, spec)
    texts = table[spec.text].tolist() if spec.text else [None] * len(table)

    def embeddings(kind: str, column: str | None) -> tuple[np.ndarray, int]:
        if not column:
            return np.zeros((len(ids), 0), np.float32), 1
        return _embeddings(features, side, kind, ids, column, table[column].tolist())

    text, text_set = embeddings("text", spec.text)
    return SideContent(
        ids=ids,
        text=_with_unknown_row(text),
        text_set=text_set,
        image=_with_unknown_row(embeddings("image", spec.image)[0]),
        structured=_with_unknown_row(encoder.transform(table)),
        words=_with_unknown_row(bag_of_words(texts) if spec.text else np.zeros((len(ids), 0))),
        encoder=encoder,
        pixels=_with_unknown_row(raw_pixels(images_root, table[spec.image].tolist()))
        if images_root is not None and spec.image else None,
    )
