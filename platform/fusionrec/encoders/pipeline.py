"""`fusionrec encode`: a Ray Data pipeline from a dataset's text and images to feature tables.

    rows -> CPU tasks (hash, decode/resize or tokenise) -> actor pool (forward passes) -> tables

(the stages: encoders/batch_inference.py). One table per side (users, items) and kind (text,
image): `id`, `content_hash` (sha256 of the text or of the image file), `embedding`
(float32[dim]), `mask` (1 = encoded, 0 = no content), with the encoder's name, model, dim,
pooling and precision (and, for text, how it was chunked; a sentence set also records
`set_size`, and its `dim` is set_size x the model's width) in the Parquet metadata. Missing text
or images become a zero vector with mask 0.

Incremental: when tables made by the same encoder exist, a first distributed pass hashes the
current contents, and a row whose hash is unchanged keeps its embedding; only new or changed rows
go through the model. The driver never reads an image: it holds ids, texts and image paths, and
writes the results into the tables (in the dataset's order) as they stream back, so its memory
does not grow with the new embeddings (a re-run holds the vectors it keeps from the last tables).
The tables are written as one set, the tables of the dataset's current text and image columns and
no others.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fusionrec.data.io import atomic_file, is_missing
from fusionrec.data.problems import DataError, Problem
from fusionrec.data.validate import Dataset
from fusionrec.encoders.base import (
    CHUNK_POOLINGS,
    DEFAULT_IMAGE_MODEL,
    DEFAULT_TEXT_MODEL,
    POOLINGS,
    PRECISIONS,
    TEXT_CHUNKS,
    check_choice,
    image_settings,
    load_pretrained,
    resolve_model,
    set_size,
)
from fusionrec.encoders.batch_inference import (
    ForwardPass,
    PoolPlan,
    hash_contents,
    plan_pool,
    prepare_images,
    prepare_texts,
)
from fusionrec.verbosity import without_actor_notices

KINDS = ("text", "image")
SIDES = ("users", "items")
METADATA_KEY = b"fusionrec"
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # this process's C library
WRITE_ROWS = 8192  # rows per Parquet row group as the tables are written
IMAGE_BLOCK = 64  # pictures per preprocessing task
PREPARE_MEMORY = 256 * 1024**2  # heap a preprocessing task asks for (64 pictures at 1024 px: 192 MiB)


@dataclass(frozen=True)
class EncodeConfig:
    cache: Path
    text_model: str = DEFAULT_TEXT_MODEL
    image_model: str = DEFAULT_IMAGE_MODEL
    pooling: str = "cls"
    text_chunks: str = "sentence"  # see encoders/base.py; "none" reads each text whole (the paper's way)
    chunk_pooling: str = "mean"  # or "set": sentence vectors kept for FusionNeuMF to attend over (docs/quality.md)
    batch_size: int | None = None  # rows per forward-pass call; None: by device (batch_inference.BATCH_SIZE)
    actors: int = 2  # CPU actors; with GPUs (gpus_per_actor None) one actor per GPU instead
    gpus_per_actor: float | None = None  # None: auto (1 when the cluster has GPUs, else CPU actors)
    precision: str = "auto"  # bf16 on CUDA, fp32 on the CPU; or fp32 / bf16 everywhere
    image_size: int | None = None
    strict: bool = False

    def check(self) -> None:
        if (self.batch_size is not None and self.batch_size < 1) or self.actors < 1:
            raise ValueError("--batch-size and --actors must be at least 1")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError("--gpus-per-actor must be auto or at least 0")
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("--text-chunks", self.text_chunks, TEXT_CHUNKS)
        check_choice("--chunk-pooling", self.chunk_pooling, CHUNK_POOLINGS)
        check_choice("--precision", self.precision, PRECISIONS)
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


def _contents(dataset: Dataset, side: str, kind: str) -> pd.DataFrame | None:
    """Per row: id, key ("side/id") and value: the text, or the image path as the dataset gives it
    (None: no content). Nothing is read or hashed here."""
    spec = dataset.spec.users if side == "users" else dataset.spec.items
    column = spec.text if kind == "text" else spec.image
    if not column:
        return None
    table = dataset.users if side == "users" else dataset.items
    values = [None if is_missing(v) else str(v) for v in table[column]]
    return pd.DataFrame({"id": table[spec.id].astype(str).to_numpy(), "value": values}).assign(
        key=lambda f: side + "/" + f["id"])


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


def _blocks(rows: pd.DataFrame, size: int):
    """A Ray dataset of rows (key, value), one block per `size` rows: each block is one
    preprocessing task, so the tasks spread over every CPU. The blocks are Arrow slices put in the
    object store as they are: `from_pandas` (and `from_arrow`) run a Ray task per block for its
    metadata before returning, which held 100,000 rows in blocks of 64 back 7-14 s on 2 CPUs and
    added some 60 MB to the driver's peak."""
    import ray

    table = pa.Table.from_pandas(rows, preserve_index=False)
    return ray.data.from_blocks([table.slice(start, size) for start in range(0, len(rows), size)])


def _reused(kind: str, frame: pd.DataFrame, previous: dict[str, tuple[str, np.ndarray]], root: Path
            ) -> tuple[list, list]:
    """Per row: the hash and embedding it keeps from the last tables (None: encode it). Today's
    contents of the rows the last tables hold are hashed in Ray tasks, where the files are."""
    hashes, embeddings = [None] * len(frame), [None] * len(frame)
    known = frame["value"].notna().to_numpy() & frame["id"].isin(previous.keys()).to_numpy()
    if not known.any():
        return hashes, embeddings
    rows = frame[known]
    ds = _blocks(rows[["key", "value"]], 1024).map_batches(hash_contents, fn_kwargs={"kind": kind, "root": str(root)},
                                                           batch_size=None, batch_format="numpy")
    today = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        today.update(zip(batch["key"], batch["content_hash"], strict=True))
    for position, entity_id, key in zip(np.flatnonzero(known), rows["id"], rows["key"], strict=True):
        old_hash, old_embedding = previous[entity_id]
        if today[key] == old_hash:
            hashes[position], embeddings[position] = old_hash, old_embedding
    return hashes, embeddings


def _encode_stream(kind: str, todo: pd.DataFrame, root: Path, model: str, name: str, cfg: EncodeConfig,
                   pool: PoolPlan) -> Iterable[dict[str, np.ndarray]]:
    """Result batches (key, content_hash, embedding, error) of `todo`'s rows, roughly in their order."""
    import ray

    if kind == "image":  # pictures travel already at the side the model reads
        size = cfg.image_size or image_settings(model, _model_config(model))[0]
        prepare, kwargs = prepare_images, {"root": str(root), "size": size}
    else:
        prepare, kwargs = prepare_texts, {"model": model, "chunks": cfg.text_chunks}
    batch_size = pool.batch_size[kind]
    actors = max(1, min(pool.actors, -(-len(todo) // batch_size)))
    # On a GPU, two calls in flight per actor: one stages its batch while the other's forward runs.
    overlap = {"max_concurrent_calls_per_actor": 2, "enable_true_multi_threading": True} if pool.gpus_per_actor else {}
    # Pictures are preprocessed in smaller tasks (a block of 256 is 38 MB at 224 px): more of them
    # run at once, and the actor's batch is assembled from several. Ray Data fuses tasks into the next
    # stage's actors when their resource requests match (its docs, "Operator Fusion"): the memory
    # request, which the actors never make, keeps preprocessing a stage of its own on any pool.
    ds = _blocks(todo[["key", "value"]], min(batch_size, IMAGE_BLOCK) if kind == "image" else batch_size).map_batches(
        prepare, fn_kwargs=kwargs, batch_size=None, batch_format="numpy", num_cpus=1, memory=PREPARE_MEMORY,
    ).map_batches(
        ForwardPass,
        fn_constructor_kwargs={"kind": kind, "model": model, "name": name, "pooling": cfg.pooling,
                               "image_size": cfg.image_size, "chunks": cfg.text_chunks,
                               "chunk_pooling": cfg.chunk_pooling, "precision": pool.precision,
                               "threads": pool.threads},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors, **overlap),
        num_cpus=pool.cpus_per_actor, num_gpus=pool.gpus_per_actor or None,
    )
    return ds.iter_batches(batch_size=None, batch_format="numpy")


class _Results:
    """The result stream, taken a list of keys at a time. Results come back in roughly the order
    they were sent; the few that overtake others wait here until their rows are written."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]] | None, on_batch: Callable[[int], None]):
        self.batches, self.on_batch = iter(batches or ()), on_batch
        self.pending: dict[str, tuple[str, np.ndarray, str]] = {}  # key -> (content_hash, embedding, error)

    def take(self, keys: list[str]) -> list[tuple[str, np.ndarray, str]]:
        while any(key not in self.pending for key in keys):
            batch = next(self.batches)
            self.pending.update(zip(batch["key"], zip(batch["content_hash"], batch["embedding"], batch["error"],
                                                      strict=True), strict=True))
            self.on_batch(len(batch["key"]))
        return [self.pending.pop(key) for key in keys]


def _return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; nothing elsewhere). glibc
    keeps the pages the result batches freed, scattered between live objects: without this the
    driver's RSS crept up with the item count (benchmarks/encode.py --scale: 17 MB more growth at
    100,000 items than at 10,000) while what it held alive stayed flat."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _schema(dim: int, meta: dict) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("content_hash", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                      ("mask", pa.int8())], metadata={METADATA_KEY: json.dumps(meta).encode()})


def _table(frame: pd.DataFrame, dim: int, meta: dict) -> pa.Table:
    """frame: id, content_hash, embedding (one vector per row), mask."""
    matrix = embedding_matrix(frame) if len(frame) else np.zeros((0, dim), np.float32)
    return pa.table({
        "id": pa.array(frame["id"].astype(str).tolist(), pa.string()),
        "content_hash": pa.array(frame["content_hash"].tolist(), pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), pa.float32()), dim),
        "mask": pa.array(frame["mask"].astype(np.int8).to_numpy(), pa.int8()),
    }, schema=_schema(dim, meta))


def _write(path: Path, frame: pd.DataFrame, dim: int, meta: dict) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(_table(frame, dim, meta), tmp)


def _write_side(writer: pq.ParquetWriter, frame: pd.DataFrame, results: _Results, dim: int, side: str, kind: str,
                problems: list[Problem]) -> TableReport:
    """One side's table in the dataset's order, a chunk at a time: reused rows keep their vectors,
    sent rows take their results as they come back, the rest are zeros."""
    report = TableReport(side, kind, len(frame), int(frame["sent"].sum()), int(frame["value"].isna().sum()))
    for start in range(0, len(frame), WRITE_ROWS):
        part = frame.iloc[start:start + WRITE_ROWS]
        sent = part["sent"].to_numpy()
        reused = part["reused_hash"].notna().to_numpy()
        embedding = np.zeros((len(part), dim), np.float32)
        hashes = part["reused_hash"].fillna("").to_numpy(object).copy()
        mask = reused.astype(np.int8)
        if reused.any():
            embedding[reused] = np.stack(part["reused_embedding"].to_numpy()[reused])
        rows = np.flatnonzero(sent)
        for row, (content_hash, vector, error) in zip(rows, results.take(list(part["key"].to_numpy()[sent])),
                                                      strict=True):
            hashes[row] = content_hash
            if error:
                entity_id = part["id"].iat[row]
                report.failed.append(f"{side}: {entity_id}: {error}")
                problems.append(Problem(f"{side} {kind}", None, str(entity_id), str(error)))
            else:
                embedding[row], mask[row] = vector, 1
        writer.write_table(pa.table({"id": pa.array(part["id"].tolist(), pa.string()),
                                     "content_hash": pa.array(hashes.tolist(), pa.string()),
                                     "embedding": pa.FixedSizeListArray.from_arrays(embedding.reshape(-1), dim),
                                     "mask": pa.array(mask, pa.int8())}, schema=writer.schema))
        _return_free_heap()
    return report


def _model_config(model: str):
    """The model's config: a local folder's config.json read as it is (importing transformers would
    cost the driver seconds before the first result), else transformers' AutoConfig."""
    path = Path(model) / "config.json"
    if path.is_file():
        return SimpleNamespace(**json.loads(path.read_text()))
    from transformers import AutoConfig

    return load_pretrained(model, AutoConfig)


def _model_meta(kind: str, cfg: EncodeConfig) -> tuple[str, str, dict]:
    alias = cfg.text_model if kind == "text" else cfg.image_model
    model = resolve_model(alias, cfg.cache)
    name = alias if alias in (DEFAULT_TEXT_MODEL, DEFAULT_IMAGE_MODEL) else Path(alias).name
    meta = {"encoder": name, "model": model, "kind": kind, "dim": int(_model_config(model).hidden_size),
            "pooling": cfg.pooling}
    if kind == "image":
        meta["image_size"] = cfg.image_size
    else:
        meta |= {"chunks": cfg.text_chunks, "chunk_pooling": cfg.chunk_pooling}
        size = set_size(cfg.text_chunks, cfg.chunk_pooling)
        if size > 1:  # each row: `size` vectors of dim / size side by side, zero-padded
            meta |= {"set_size": size, "dim": meta["dim"] * size}
    return model, name, meta


@contextlib.contextmanager
def _removed_if_new_on_failure(out: Path):
    """A failed run leaves no output folder it created (its files are already gone, not renamed)."""
    new = not out.exists()
    try:
        yield
    except BaseException:
        if new and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _pool(cfg: EncodeConfig) -> PoolPlan:
    import ray

    from fusionrec.ops.ray_runtime import ensure_ray

    ensure_ray()
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=1)
    return plan_pool(ray.cluster_resources(), largest, cfg.actors, cfg.gpus_per_actor, cfg.batch_size, cfg.precision)


def encode_dataset(dataset: Dataset, out: Path, cfg: EncodeConfig, on_plan: Callable[[PoolPlan], None] | None = None,
                   on_batch: Callable[[str, int], None] | None = None) -> list[TableReport]:
    """Encode every text and image column of `dataset` into feature tables under `out`, written as
    one set: the tables of this dataset's current columns, nothing else. `on_plan` is told how the
    model stage will run; `on_batch(kind, rows)` is called as each batch of results arrives
    (benchmarks/encode.py times them)."""
    from tqdm import tqdm

    cfg.check()
    out = Path(out)
    contents = {kind: {side: frame for side in SIDES if (frame := _contents(dataset, side, kind)) is not None}
                for kind in KINDS}
    # No column of a kind, or one empty everywhere: no model, no table.
    contents = {kind: sides for kind, sides in contents.items()
                if any(frame["value"].notna().any() for frame in sides.values())}
    # Every model this needs is found (the default ViT prepared on first use) before Ray starts.
    models = {kind: _model_meta(kind, cfg) for kind in contents}
    pool = _pool(cfg) if contents else None
    if pool and on_plan:
        on_plan(pool)
    for _, _, meta in models.values():
        meta["precision"] = pool.precision  # what the device chose (auto: bf16 on CUDA)
    reports: list[TableReport] = []
    problems: list[Problem] = []
    # Each atomic_file renames its table on success and removes it on failure.
    with _removed_if_new_on_failure(out), contextlib.ExitStack() as files, without_actor_notices():
        written = []
        for kind, sides in contents.items():
            model, name, meta = models[kind]
            for side, frame in sides.items():
                previous = _previous(feature_path(out, side, kind), meta)
                frame["reused_hash"], frame["reused_embedding"] = _reused(kind, frame, previous, dataset.root)
                frame["sent"] = frame["value"].notna() & frame["reused_hash"].isna()
            todo = pd.concat([frame[frame["sent"]] for frame in sides.values()], ignore_index=True)
            with tqdm(total=len(todo), desc=f"encoding {kind}", unit=kind, disable=None) as bar:
                def arrived(n: int, kind=kind, bar=bar) -> None:
                    bar.update(n)
                    if on_batch:
                        on_batch(kind, n)

                stream = _encode_stream(kind, todo, dataset.root, model, name, cfg, pool) if len(todo) else None
                results = _Results(stream, arrived)
                for side, frame in sides.items():
                    path = feature_path(out, side, kind)
                    writer = files.enter_context(pq.ParquetWriter(files.enter_context(atomic_file(path)),
                                                                  _schema(meta["dim"], meta)))
                    reports.append(_write_side(writer, frame, results, meta["dim"], side, kind, problems))
                    written.append(path)
        if cfg.strict and problems:
            raise DataError(problems)
        manifest = {"dataset": str(dataset.root), "config": {k: str(v) for k, v in asdict(cfg).items()},
                    "pool": asdict(pool) if pool else None,
                    "tables": [r.__dict__ | {"failed": len(r.failed)} for r in reports]}
        files.enter_context(atomic_file(out / "features.json")).write_text(json.dumps(manifest, indent=2))
    for path in {feature_path(out, side, kind) for side in SIDES for kind in KINDS} - set(written):
        path.unlink(missing_ok=True)  # a table this run did not write (its column is gone, or empty everywhere now)
    return reports
