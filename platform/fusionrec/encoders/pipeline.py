"""`fusionrec encode`: a Ray Data pipeline from a dataset's text and images to feature tables.

    read rows -> map_batches(EncodeBatch, actor pool, num_gpus per actor) -> FEATURES/{side}.{kind}.parquet

One table per side (users, items) and kind (text, image): `id`, `content_hash` (sha256 of the
text or of the image file), `embedding` (float32[dim]), `mask` (1 = encoded, 0 = no content),
with the encoder's name, model, dim and pooling (and, for text, how it was chunked; a sentence set
also records `set_size`, and its `dim` is set_size x the model's width) in the Parquet metadata.
Missing text or images become a zero vector with mask 0. Incremental: a row whose hash
(and encoder) is unchanged keeps its embedding; only new or changed rows go through Ray. The
tables are written as one set, the tables of the dataset's current text and image columns and no
others (see _write_set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.data.images import ImageProblem, open_image, resolve_image_path
from fusionrec.data.io import atomic_file, is_missing
from fusionrec.data.problems import DataError, Problem
from fusionrec.data.validate import Dataset
from fusionrec.encoders.base import (
    CHUNK_POOLINGS,
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    POOLINGS,
    TEXT_CHUNKS,
    ImageEncoder,
    TextEncoder,
    check_choice,
    load_pretrained,
    resolve_model,
    set_size,
)

KINDS = ("text", "image")
SIDES = ("users", "items")
METADATA_KEY = b"fusionrec"


@dataclass(frozen=True)
class EncodeConfig:
    cache: Path
    text_model: str = DEFAULT_TEXT_MODEL
    image_model: str = DEFAULT_IMAGE_MODEL
    pooling: str = "cls"
    text_chunks: str = "sentence"  # see encoders/base.py; "none" reads each text whole (the paper's way)
    chunk_pooling: str = "mean"  # or "set": sentence vectors kept for FusionNeuMF to attend over (docs/quality.md)
    batch_size: int = 32
    actors: int = 2
    gpus_per_actor: float = 0.0
    image_size: int | None = None
    strict: bool = False

    def check(self) -> None:
        if self.batch_size < 1 or self.actors < 1 or self.gpus_per_actor < 0:
            raise ValueError("--batch-size and --actors must be at least 1, --gpus-per-actor at least 0")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("--text-chunks", self.text_chunks, TEXT_CHUNKS)
        check_choice("--chunk-pooling", self.chunk_pooling, CHUNK_POOLINGS)
        if self.image_size is not None and not 14 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be between 14 and 1024 pixels, got {self.image_size}")


@dataclass
class TableReport:
    side: str
    kind: str
    rows: int
    encoded: int
    missing: int
    failed: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = f", {self.missing} without content" if self.missing else ""
        extra += f", {len(self.failed)} failed" if self.failed else ""
        return f"{self.side}.{self.kind}: {self.encoded} of {self.rows} re-encoded{extra}"


def feature_path(folder: Path, side: str, kind: str) -> Path:
    return Path(folder) / f"{side}.{kind}.parquet"


def _metadata(schema: pa.Schema) -> dict:
    return json.loads((schema.metadata or {}).get(METADATA_KEY, b"{}"))


def read_features(path: Path) -> tuple[pd.DataFrame, dict]:
    """A feature table as (frame with id, content_hash, embedding [n, dim] in a column, mask; metadata)."""
    table = pq.read_table(path)
    return table.to_pandas(), _metadata(table.schema)


def feature_encoders(folder: Path) -> dict[str, dict]:
    """The encoder metadata of each feature table in `folder`, keyed "users.text", "items.image", ..."""
    return {f"{side}.{kind}": _metadata(pq.read_schema(feature_path(folder, side, kind)))
            for side in SIDES for kind in KINDS if feature_path(folder, side, kind).is_file()}


def embedding_matrix(frame: pd.DataFrame) -> np.ndarray:
    return np.stack(frame["embedding"].to_numpy()).astype(np.float32) if len(frame) else np.zeros((0, 0), np.float32)


class EncodeBatch:
    """A Ray Data callable class: each actor loads the encoder once and encodes batches."""

    def __init__(self, kind: str, model: str, name: str, pooling: str, image_size: int | None, threads: int,
                 chunks: str, chunk_pooling: str):
        import torch

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.kind = kind
        if kind == "text":
            self.encoder = TextEncoder(model, pooling=pooling, device=device, name=name, chunks=chunks,
                                       chunk_pooling=chunk_pooling)
        else:
            self.encoder = ImageEncoder(model, pooling=pooling, image_size=image_size, device=device, name=name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = list(batch["payload"])
        errors = np.array([""] * len(payloads), dtype=object)
        if self.kind == "image":
            inputs = []
            for k, path in enumerate(payloads):
                try:
                    inputs.append(open_image(Path(path)))
                except ImageProblem as exc:
                    errors[k] = str(exc)
        else:
            inputs = payloads
        good = errors == ""
        embedding = np.zeros((len(payloads), self.encoder.dim), np.float32)
        if good.any():
            embedding[good] = self.encoder.encode(inputs)
        return {"key": batch["key"], "embedding": embedding, "error": errors}


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _contents(dataset: Dataset, side: str, kind: str) -> pd.DataFrame | None:
    """Per row: id, payload (text, or absolute image path), content_hash ('' = no content), problem."""
    spec = dataset.spec.users if side == "users" else dataset.spec.items
    column = spec.text if kind == "text" else spec.image
    if not column:
        return None
    table = dataset.users if side == "users" else dataset.items
    rows = []
    for entity_id, value in zip(table[spec.id], table[column], strict=True):
        if is_missing(value):
            rows.append((entity_id, None, "", ""))
        elif kind == "text":
            rows.append((entity_id, str(value), _hash(str(value).encode()), ""))
        else:
            try:
                path = resolve_image_path(dataset.root, str(value))
                rows.append((entity_id, str(path), _hash(path.read_bytes()), ""))
            except ImageProblem as exc:
                rows.append((entity_id, None, "", str(exc)))
    return pd.DataFrame(rows, columns=["id", "payload", "content_hash", "problem"])


def _previous(path: Path, meta: dict) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (hash, embedding) of rows in an existing table made by the same encoder."""
    if not path.is_file():
        return {}
    try:
        frame, old_meta = read_features(path)
    except Exception:  # noqa: BLE001 - an unreadable old table just means: encode everything again
        return {}
    if old_meta != meta:
        return {}
    done = frame[frame["mask"] == 1]
    return {i: (h, e) for i, h, e in zip(done["id"], done["content_hash"], done["embedding"], strict=True)}


def _run_ray(kind: str, todo: pd.DataFrame, model: str, name: str, cfg: EncodeConfig) -> pd.DataFrame:
    """Encode `todo` (key, payload) on Ray with an actor pool; returns key, embedding, error."""
    import ray
    from tqdm import tqdm

    from fusionrec.ray_runtime import cpus_each, ensure_ray

    ensure_ray()
    batches = -(-len(todo) // cfg.batch_size)
    actors = min(cfg.actors, batches)
    threads = cpus_each(actors) if cfg.gpus_per_actor == 0 else 1
    # One block per batch, so that every actor in the pool gets work.
    rows = todo[["key", "payload"]].reset_index(drop=True)
    ds = ray.data.from_pandas([rows.iloc[part] for part in np.array_split(np.arange(len(rows)), batches)])
    encoded = ds.map_batches(
        EncodeBatch,
        fn_constructor_kwargs={"kind": kind, "model": model, "name": name, "pooling": cfg.pooling,
                               "image_size": cfg.image_size, "threads": threads, "chunks": cfg.text_chunks,
                               "chunk_pooling": cfg.chunk_pooling},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=threads if cfg.gpus_per_actor == 0 else 1,
        num_gpus=cfg.gpus_per_actor or None,
    )
    keys, embeddings, errors = [], [], []
    with tqdm(total=len(todo), desc=f"encoding {kind}", unit=kind, disable=None) as bar:
        for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
            keys.extend(batch["key"])
            embeddings.extend(batch["embedding"])
            errors.extend(batch["error"])
            bar.update(len(batch["key"]))
    return pd.DataFrame({"key": keys, "embedding": embeddings, "error": errors})


def _table(frame: pd.DataFrame, dim: int, meta: dict) -> pa.Table:
    matrix = embedding_matrix(frame) if len(frame) else np.zeros((0, dim), np.float32)
    return pa.table({
        "id": pa.array(frame["id"].astype(str).tolist(), pa.string()),
        "content_hash": pa.array(frame["content_hash"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim),
        "mask": pa.array(frame["mask"].astype(np.int8).to_numpy(), pa.int8()),
    }).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})


def _write(path: Path, frame: pd.DataFrame, dim: int, meta: dict) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(_table(frame, dim, meta), tmp)


def _write_set(out: Path, tables: dict[Path, pa.Table], manifest: dict) -> None:
    """Replace the feature tables in `out` as one set: every file is written under a temporary name
    first (a failure removes them all and leaves the old set as it was), then all are renamed; a
    table this run did not write (its column is gone, or empty everywhere now) is removed, so that
    none is left stale."""
    with contextlib.ExitStack() as renames:  # each atomic_file renames on success, cleans up on failure
        for path, table in tables.items():
            pq.write_table(table, renames.enter_context(atomic_file(path)))
        renames.enter_context(atomic_file(out / "features.json")).write_text(json.dumps(manifest, indent=2))
    for side in SIDES:
        for kind in KINDS:
            if feature_path(out, side, kind) not in tables:
                feature_path(out, side, kind).unlink(missing_ok=True)


def _model_meta(kind: str, cfg: EncodeConfig) -> tuple[str, str, dict]:
    alias = cfg.text_model if kind == "text" else cfg.image_model
    from transformers import AutoConfig

    model = resolve_model(alias, cfg.cache)
    name = alias if alias in (DEFAULT_TEXT_MODEL, DEFAULT_IMAGE_MODEL) else Path(alias).name
    dim = int(load_pretrained(model, AutoConfig).hidden_size)
    meta = {"encoder": name, "model": model, "kind": kind, "dim": dim, "pooling": cfg.pooling}
    if kind == "image":
        meta["image_size"] = cfg.image_size
    else:
        meta |= {"chunks": cfg.text_chunks, "chunk_pooling": cfg.chunk_pooling}
        size = set_size(cfg.text_chunks, cfg.chunk_pooling)
        if size > 1:  # each row: `size` vectors of dim / size side by side, zero-padded
            meta |= {"set_size": size, "dim": meta["dim"] * size}
    return model, name, meta


def encode_dataset(dataset: Dataset, out: Path, cfg: EncodeConfig) -> list[TableReport]:
    """Encode every text and image column of `dataset` into feature tables under `out`, written as
    one set: the tables of this dataset's current columns, nothing else."""
    cfg.check()
    out = Path(out)
    # Every model this needs is found (the default ViT prepared on first use) before any work.
    plans = []
    for kind in KINDS:
        sides = {side: _contents(dataset, side, kind) for side in SIDES}
        sides = {side: frame for side, frame in sides.items() if frame is not None}
        if not any(frame["payload"].notna().any() or (frame["problem"] != "").any() for frame in sides.values()):
            continue  # no column of this kind, or one that is empty everywhere: no model, no table
        plans.append((kind, sides, *_model_meta(kind, cfg)))
    reports: list[TableReport] = []
    tables: dict[Path, pa.Table] = {}
    problems: list[Problem] = []
    for kind, sides, model, name, meta in plans:
        todo_parts = []
        for side, frame in sides.items():
            previous = _previous(feature_path(out, side, kind), meta)
            reuse = [i in previous and previous[i][0] == h for i, h in zip(frame["id"], frame["content_hash"],
                                                                             strict=True)]
            frame["reused"] = reuse
            frame["key"] = side + "/" + frame["id"].astype(str)
            todo_parts.append(frame[~frame["reused"] & frame["payload"].notna()])
            frame["embedding"] = [previous[i][1] if r else None for i, r in zip(frame["id"], reuse, strict=True)]
        todo = pd.concat(todo_parts, ignore_index=True)
        results = _run_ray(kind, todo, model, name, cfg).set_index("key") if len(todo) else None
        for side, frame in sides.items():
            zero = np.zeros(meta["dim"], np.float32)
            failed = []
            embeddings, masks = [], []
            for row in frame.itertuples():
                if row.reused:
                    embeddings.append(row.embedding)
                    masks.append(1)
                    continue
                sent = pd.notna(row.payload)  # no payload: no content, or a path problem found here
                error = results.at[row.key, "error"] if sent else row.problem
                if error:
                    failed.append(f"{side}: {row.id}: {error}")
                    problems.append(Problem(f"{side} {kind}", None, str(row.id), error))
                ok = sent and not error
                embeddings.append(results.at[row.key, "embedding"] if ok else zero)
                masks.append(int(ok))
            frame["embedding"], frame["mask"] = embeddings, masks
            encoded = int((~frame["reused"] & frame["payload"].notna()).sum())
            missing = int((frame["payload"].isna() & (frame["problem"] == "")).sum())
            reports.append(TableReport(side, kind, len(frame), encoded, missing, failed))
            tables[feature_path(out, side, kind)] = _table(frame, meta["dim"], meta)
    if cfg.strict and problems:
        raise DataError(problems)
    manifest = {"dataset": str(dataset.root), "config": {k: str(v) for k, v in asdict(cfg).items()},
                "tables": [r.__dict__ | {"failed": len(r.failed)} for r in reports]}
    _write_set(out, tables, manifest)
    return reports
