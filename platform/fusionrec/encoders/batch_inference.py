"""The encode job's Ray Data stages, shaped as batch inference so that a GPU stays busy:

    rows (key, value)
      -> map_batches(prepare_images | prepare_texts)   stateless CPU tasks, spread over every CPU:
                                                       content hash; read, decode, resize to uint8 /
                                                       sentence split, tokenise
      -> map_batches(ForwardPass, actor pool)          the model only: compact arrays to the device,
                                                       one forward pass, pooled vectors back
      -> key, content_hash, embedding, error

Preprocessing never runs in the model actor, so the device waits on nothing but its own copies;
what crosses the object store is uint8 pixels and int32 token ids, not floats. `hash_contents` is
the cheap pass an incremental run makes first, to find what changed since the last tables.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

import numpy as np

from fusionrec.data.images import ImageProblem, open_image, resolve_image_path
from fusionrec.encoders.base import ImageEncoder, TextEncoder, resolve_precision, tokenize
from fusionrec.encoders.prepare import resized_rgb
from fusionrec.ops.ray_runtime import assigned_device

# Rows per forward-pass call when --batch-size is not given. On a GPU, large calls keep the
# per-call costs (Ray, Python) small against the forward pass; a text is about five sentences.
BATCH_SIZE = {"cuda": {"text": 1024, "image": 256}, "cpu": {"text": 32, "image": 32}}


@dataclass(frozen=True)
class PoolPlan:
    """How the model stage runs on this cluster."""

    device: str  # "cuda" or "cpu": what each actor runs on
    precision: str  # "fp32" or "bf16", resolved for that device
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float  # what each actor reserves in Ray
    threads: int  # torch threads in each actor
    batch_size: dict[str, int]  # per kind

    def line(self) -> str:
        where = f"{self.gpus_per_actor:g} GPU each" if self.gpus_per_actor else f"{self.threads} CPU threads each"
        batches = ", ".join(f"{size} {kind}s" for kind, size in self.batch_size.items())
        return f"{self.actors} encoder actor(s) on {self.device}, {where}, {self.precision}, batches of {batches}"


def plan_pool(resources: dict, largest_node_cpus: float, actors: int, gpus_per_actor: float | None,
              batch_size: int | None, precision: str) -> PoolPlan:
    """The actor pool for a cluster with `resources` (Ray's cluster_resources()).

    `gpus_per_actor` None (auto): one actor per GPU with num_gpus=1 when the cluster has GPUs,
    else `actors` CPU actors. CPU actors share the CPUs but leave one free, so that the
    preprocessing tasks always have somewhere to run (an actor pool holding every CPU would wait
    on its own input forever)."""
    gpus, cpus = float(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    if gpus_per_actor is None:
        gpus_per_actor, actors = (1.0, int(gpus)) if gpus >= 1 else (0.0, actors)
    elif gpus_per_actor > 0 and gpus_per_actor > gpus:
        raise ValueError(f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has {gpus:g} GPU(s)")
    device = "cuda" if gpus_per_actor > 0 else "cpu"
    if device == "cuda":
        threads, reserved = 1, 1.0
    else:
        threads = max(1, min(int(largest_node_cpus), int(cpus) // actors))
        reserved = max(0.0, min(float(threads), (cpus - 1) / actors))
    return PoolPlan(device, resolve_precision(precision, device), actors, gpus_per_actor, reserved, threads,
                    {kind: batch_size or default for kind, default in BATCH_SIZE[device].items()})


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_image(root: str, value: str) -> bytes:
    return resolve_image_path(root, value).read_bytes()


def hash_contents(batch: dict[str, np.ndarray], kind: str, root: str) -> dict[str, np.ndarray]:
    """key, content_hash ('' where the content cannot be read), error."""
    hashes, errors = [], []
    for value in batch["value"]:
        try:
            data = str(value).encode() if kind == "text" else _read_image(root, str(value))
            hashes.append(content_hash(data))
            errors.append("")
        except ImageProblem as exc:
            hashes.append("")
            errors.append(str(exc))
    return {"key": batch["key"], "content_hash": np.array(hashes, object), "error": np.array(errors, object)}


def prepare_images(batch: dict[str, np.ndarray], root: str, size: int) -> dict[str, np.ndarray]:
    """Each image file read once: hashed, decoded, resized to uint8 [size, size, 3] (zeros where it
    cannot be used, with the reason in `error`)."""
    n = len(batch["key"])
    rgb = np.zeros((n, size, size, 3), np.uint8)
    hashes, errors = np.full(n, "", object), np.full(n, "", object)
    for k, value in enumerate(batch["value"]):
        try:
            data = _read_image(root, str(value))
            hashes[k] = content_hash(data)
            rgb[k] = resized_rgb(open_image(io.BytesIO(data), name=os.path.basename(str(value))), size)
        except ImageProblem as exc:
            errors[k] = str(exc)
    return {"key": batch["key"], "content_hash": hashes, "error": errors, "rgb": rgb}


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array of arrays (np.array would stack equal-length ones into 2-D)."""
    out = np.empty(len(arrays), object)
    out[:] = arrays
    return out


def prepare_texts(batch: dict[str, np.ndarray], model: str, chunks: str) -> dict[str, np.ndarray]:
    """Each text hashed and tokenised (sentence by sentence with chunks="sentence"), unpadded."""
    # One Rust thread per task: the tasks already spread over every CPU.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    texts = [str(value) for value in batch["value"]]
    tokens, lengths = tokenize(model, texts, chunks)
    return {"key": batch["key"], "content_hash": np.array([content_hash(t.encode()) for t in texts], object),
            "error": np.full(len(texts), "", object), "tokens": _ragged(tokens), "lengths": _ragged(lengths)}


class ForwardPass:
    """The model stage: each actor loads its encoder once and runs forward passes, nothing else."""

    def __init__(self, kind: str, model: str, name: str, pooling: str, image_size: int | None, chunks: str,
                 chunk_pooling: str, precision: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        # CUDA only when Ray assigned this actor a GPU: one that reserved none never touches CUDA.
        device = str(assigned_device())
        self.kind = kind
        if kind == "text":
            self.encoder = TextEncoder(model, pooling=pooling, device=device, name=name, chunks=chunks,
                                       chunk_pooling=chunk_pooling, precision=precision)
        else:
            self.encoder = ImageEncoder(model, pooling=pooling, image_size=image_size, device=device, name=name,
                                        precision=precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = batch["error"] == ""
        embedding = np.zeros((len(good), self.encoder.dim), np.float32)
        if good.any():
            if self.kind == "image":  # (a mask would copy the whole batch; most have no failed image)
                embedding[good] = self.encoder.forward(batch["rgb"] if good.all() else batch["rgb"][good])
            else:
                embedding[good] = self.encoder.forward(batch["tokens"][good], batch["lengths"][good])
        return {"key": batch["key"], "content_hash": batch["content_hash"], "embedding": embedding,
                "error": batch["error"]}
